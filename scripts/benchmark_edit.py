#!/usr/bin/env python3
"""Editing throughput of ip2p_jax on the real InstructPix2Pix (SD 1.5) architecture.

Random weights are built by jax.random inside jit directly on the device (no checkpoint,
no conversion); FLOPs and memory traffic are those of the real model. Prints one JSON object
per line, comparable with scripts/peer_edit.py (diffusers) run in the same call:

  python scripts/benchmark_edit.py [--tiny] [--steps 20] [--batches 1,4,16] [--res 512]

--tiny: a tiny random model at 32x32, 4 steps, batches 1,2 (checks the script on CPU).

Per batch: end-to-end `EditPipeline.edit` (PIL in, PIL out; warm, median of --repeats),
images/s, the UNet forward on the 3-way guidance batch (ms), achieved TFLOP/s and peak
device memory. Imports only jax/flax/numpy/PIL and ip2p_jax modules that need nothing else.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from ip2p_jax import cpu_devices  # noqa: E402
from bench_common import (CLIP_L, SD15_UNET, SD_VAE, TINY_CLIP, TINY_UNET, TINY_VAE, UNET_GFLOP_512,  # noqa: E402
                          edit_gflop_per_image, mfu, peak_memory_gib)

SD15 = {"unet": SD15_UNET, "vae": SD_VAE,
        "text": dict(CLIP_L, pad_token_id=49407, bos_token_id=49406, eos_token_id=49407)}
TINY = {"unet": TINY_UNET, "vae": TINY_VAE,   # the peer script's --tiny shapes
        "text": dict(TINY_CLIP, pad_token_id=999, bos_token_id=998, eos_token_id=999)}


class WordTokenizer:
    """Stand-in for the CLIP tokenizer (weights are random, so token identity is irrelevant):
    BOS, one stable id per word, EOS, with the interface ip2p_jax.tokenizer uses."""

    def __init__(self, vocab_size: int, bos: int, eos: int):
        self.vocab_size, self.bos_token_id, self.eos_token_id, self.pad_token_id = vocab_size, bos, eos, eos

    def __call__(self, texts, padding=False, truncation=False):
        ids = [[self.bos_token_id] + [zlib.crc32(w.encode()) % (self.vocab_size - 2) for w in t.split()]
               + [self.eos_token_id] for t in texts]
        return {"input_ids": ids}


def random_params(abstract, key, dtype):
    """Params shaped like `abstract` (ShapeDtypeStructs), made by one jitted function on the
    device: kernels and embeddings normal / sqrt(fan in), norm scales 1, biases 0. No model
    forward is traced or compiled (unlike `model.init`), so this is quick everywhere."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(abstract)

    sizes = [int(np.prod(leaf.shape)) for _, leaf in paths]
    offsets = np.cumsum([0] + sizes)

    def make(key):
        noise = jax.random.normal(key, (int(offsets[-1]),), jnp.float32)   # one RNG op for the whole tree
        leaves = []
        for (path, leaf), start, size in zip(paths, offsets[:-1], sizes):
            name = getattr(path[-1], "key", str(path[-1]))
            if name == "bias":
                x = jnp.zeros(leaf.shape, dtype)
            elif name == "scale":
                x = jnp.ones(leaf.shape, dtype)
            else:
                fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else leaf.shape[-1]
                x = jax.lax.dynamic_slice_in_dim(noise, int(start), size).reshape(leaf.shape) / np.sqrt(fan_in)
            leaves.append(x.astype(dtype))
        return jax.tree.unflatten(treedef, leaves)

    return jax.jit(make)(key)


def random_components(spec: dict, dtype):
    """Components with random params created on the device in `dtype`."""
    from ip2p_jax.models import clip, unet, vae
    from ip2p_jax.weights.components import Components

    ucfg, vcfg, tcfg = (unet.UNetConfig.from_dict(spec["unet"]), vae.VAEConfig.from_dict(spec["vae"]),
                        clip.CLIPTextConfig.from_dict(spec["text"]))
    key = jax.random.key(0, impl="unsafe_rbg")   # quick to compile; quality is moot here
    params = {name: random_params(module.abstract_params(cfg), jax.random.fold_in(key, i), dtype)
              for i, (name, module, cfg) in enumerate([("unet", unet, ucfg), ("vae", vae, vcfg), ("text", clip, tcfg)])}
    tok = WordTokenizer(tcfg.vocab_size, tcfg.bos_token_id, tcfg.eos_token_id)
    return Components(unet_config=ucfg, unet_params=params["unet"], vae_config=vcfg, vae_params=params["vae"],
                      text_config=tcfg, text_params=params["text"], tokenizer=tok, scheduler_config={},
                      source="random")


def unet_step_ms(pipe, batch: int, res: int, repeats: int = 10) -> float:
    """One UNet forward on the 3-way guidance batch (3*batch rows), warm, ms."""
    c = pipe.unet_config
    h = res // pipe.vae_scale
    rep = jax.sharding.NamedSharding(pipe.mesh, jax.sharding.PartitionSpec())
    kx, kc = jax.random.split(jax.random.key(1))   # random, not zeros: constant data can run faster
    x = jax.random.normal(kx, (3 * batch, h, h, c.in_channels), jnp.float32).astype(pipe.dtype)
    t = jnp.full((3 * batch,), 500.0, jnp.float32)
    ctx = jax.random.normal(kc, (3 * batch, 77, c.cross_attention_dim), jnp.float32).astype(pipe.dtype)
    fn = jax.jit(lambda p, x, t, ctx: pipe.unet.apply({"params": p}, x, t, ctx), out_shardings=rep)
    for _ in range(2):
        fn(pipe.params["unet"], x, t, ctx).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = fn(pipe.params["unet"], x, t, ctx)
    out.block_until_ready()
    return (time.perf_counter() - t0) / repeats * 1e3


def main(argv=None) -> int:
    cpu_devices.use_every_core()   # as `ip2p edit` does (CPU only; IP2P_CPU_DEVICES=1 for one device)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny random model at 32x32 (CPU, seconds)")
    ap.add_argument("--steps", type=int, default=None, help="default 20 (--tiny: 4)")
    ap.add_argument("--batches", default=None, help="default 1,4,16 (--tiny: 1,2)")
    ap.add_argument("--res", type=int, default=None, help="default 512")
    ap.add_argument("--sampler", default="euler_a")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default=None, help="fp32 | bf16 (default: bf16 on GPU/TPU, fp32 on CPU)")
    ap.add_argument("--attention", default="auto", help="attention_impl: auto | xla | cudnn | pallas")
    ap.add_argument("--label", default="ip2p_jax", help="the rows' impl name (a variant, e.g. run with other XLA "
                                                         "flags, gets its own table row)")
    ap.add_argument("--model", default=None, help="a model folder to time instead of random SD 1.5 weights "
                                                   "(e.g. ip2p_jax/demo_model; --res then defaults to its own)")
    a = ap.parse_args(argv)
    a.steps = a.steps or (4 if a.tiny else 20)
    a.res_given, a.res = a.res is not None, a.res or 512
    a.batches = a.batches or ("1,2" if a.tiny else "1,4,16")

    from ip2p_jax import dtypes
    from ip2p_jax.pipeline import EditPipeline

    dtype = dtypes.compute_dtype(a.dtype)
    t0 = time.perf_counter()
    if a.model:
        pipe = EditPipeline.from_pretrained(a.model, dtype=dtype, attention_impl=a.attention)
        res = a.res if a.res_given else pipe.native_resolution
    else:
        res = 32 if a.tiny else a.res
        components = random_components(TINY if a.tiny else SD15, dtype)
        pipe = EditPipeline(components, dtype=dtype, attention_impl=a.attention, source="random")
    jax.block_until_ready(pipe.params)
    init_s = time.perf_counter() - t0
    dev = jax.devices()[0]
    info = {"impl": a.label, "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "device": getattr(dev, "device_kind", dev.platform), "devices": jax.device_count(),
            "jax": jax.__version__, "dtype": dtype.name, "attention": a.attention, "steps": a.steps, "res": res,
            "sampler": a.sampler, "tiny": a.tiny, "model": a.model or "random SD 1.5"}
    print(json.dumps({**info, "params_init_s": round(init_s, 2)}), flush=True)
    scale = (res / 512) ** 2
    per_image_gflop = edit_gflop_per_image(res, a.steps)
    rng = np.random.default_rng(0)
    for b in [int(x) for x in a.batches.split(",") if x]:
        images = [Image.fromarray(rng.integers(0, 256, (res, res, 3), dtype=np.uint8)) for _ in range(b)]
        # batch_size left to the pipeline, as for a user (it may split b images into several calls)
        kw = dict(steps=a.steps, sampler=a.sampler, seed=0, resize="keep", progress=False)
        t0 = time.perf_counter()
        pipe.edit(images, "make it winter", **kw)
        first = time.perf_counter() - t0
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            out = pipe.edit(images, "make it winter", **kw)
            times.append(time.perf_counter() - t0)
        assert len(out.images) == b
        med = sorted(times)[len(times) // 2]
        unet_ms = unet_step_ms(pipe, b, res)
        flops = {}
        if not a.tiny and a.model is None:  # the GFLOP figures are the SD 1.5 architecture's
            edit_tflops = b * per_image_gflop / med / 1e3
            flops = {"unet_tflops": round(3 * b * scale * UNET_GFLOP_512 / unet_ms, 1),
                     "edit_tflops": round(edit_tflops, 1), "gflop_per_image": round(per_image_gflop, 1),
                     "mfu": mfu(edit_tflops, info["device"])}
        print(json.dumps({**info, "batch": b, "first_call_s": round(first, 3), "median_s": round(med, 4),
                          "images_per_s": round(b / med, 3), "unet_step_ms_cfg3x": round(unet_ms, 2),
                          **flops, "peak_mem_gib": peak_memory_gib(),
                          "finite_fraction": round(float(np.mean([np.isfinite(x).mean() for x in out.arrays])), 4)}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
