#!/usr/bin/env python3
"""Memory of one SD 1.5-size InstructPix2Pix UNet step (3-way batch, 512² images) with the
attention forced to XLA vs the Pallas TPU kernel. Slow; not a test.

  python scripts/attention_memory.py [--images 16] [--platform tpu] [--compile]

For each impl: lowers the step for --platform (jax.export; works on any host for "tpu") and
reports the largest tensor in the program (the XLA path holds (3B, 8, 4096, 4096) fp32 scores;
the kernel path none of that size). With --compile (only on a host of that platform) it also
prints compiled.memory_analysis() temp bytes. Prints one JSON object per impl.
"""
from __future__ import annotations

import argparse
import json
import re

import jax
import jax.numpy as jnp
import numpy as np

from ip2p_jax.models.unet import UNet2DConditionModel, UNetConfig, abstract_params

SD15_IP2P = dict(sample_size=64, in_channels=8, out_channels=4, layers_per_block=2,
                 block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
TENSOR = re.compile(r"tensor<([0-9x]+)x(f32|bf16|f16)>")
BYTES = {"f32": 4, "bf16": 2, "f16": 2}


def largest_tensor(text: str) -> tuple[str, int]:
    best = ("", 0)
    for dims, dt in set(TENSOR.findall(text)):
        n = int(np.prod([int(d) for d in dims.split("x")])) * BYTES[dt]
        best = max(best, (f"{dims}x{dt}", n), key=lambda b: b[1])
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--platform", default="tpu")
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    cfg = UNetConfig.from_dict(SD15_IP2P)
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16), abstract_params(cfg))
    rows = 3 * args.images
    x = jax.ShapeDtypeStruct((rows, 64, 64, 8), jnp.bfloat16)
    t = jax.ShapeDtypeStruct((rows,), jnp.float32)
    ctx = jax.ShapeDtypeStruct((rows, 77, 768), jnp.bfloat16)
    for impl in ("xla", "pallas"):
        unet = UNet2DConditionModel(cfg, dtype=jnp.bfloat16, attention_impl=impl)
        step = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c))
        exported = jax.export.export(step, platforms=[args.platform])(params, x, t, ctx)
        text = exported.mlir_module()
        shape, size = largest_tensor(text)
        out = {"impl": impl, "platform": args.platform, "images": args.images, "largest_tensor": shape,
               "largest_tensor_gib": round(size / 2 ** 30, 3), "tpu_custom_call": "tpu_custom_call" in text}
        if args.compile:
            mem = step.lower(params, x, t, ctx).compile().memory_analysis()
            out["temp_bytes"] = getattr(mem, "temp_size_in_bytes", None)
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
