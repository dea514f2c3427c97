#!/usr/bin/env python3
"""Training throughput of ip2p_jax's train step on the real InstructPix2Pix architecture (SD 1.5 UNet with
8 input channels, SD VAE, CLIP ViT-L/14 text encoder) with random weights: the step of `ip2p train`
(VAE encode of both images, frozen text encoder, conditioning dropout, eps-MSE, AdamW on fp32 master
params, EMA), bf16 compute, state donated, compiled once per batch size. One JSON line per batch size:

  python scripts/benchmark_train.py [--tiny] [--res 256] [--batches 16,32,64] [--steps 10]
        [--mode jit|pmap] [--fsdp 1] [--remat none|dots|full] [--dtype bf16|fp32] [--grad_accum 1] [--cached]

--cached times the latent-cache path (VAE moments and text embeddings precomputed).
Imports only jax/flax/optax/numpy and ip2p_jax's models and train step (no diffusers, ml_collections,
grain or TFDS), so it runs beside scripts/peer_train.py (diffusers) on a bare accelerator machine.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench_common import (CLIP_L, SD15_UNET, SD_VAE, TINY_CLIP, TINY_UNET, TINY_VAE, mfu,  # noqa: E402
                          peak_memory_gib, train_gflop_per_example)
from ip2p_jax.diffusion.schedules import TrainingSchedule  # noqa: E402
from ip2p_jax.models.clip import CLIPTextConfig, CLIPTextModel  # noqa: E402
from ip2p_jax.models.unet import UNet2DConditionModel, UNetConfig  # noqa: E402
from ip2p_jax.models.vae import AutoencoderKL, VAEConfig  # noqa: E402
from ip2p_jax.train import parallel, state as st  # noqa: E402
from ip2p_jax.train.build import random_params  # noqa: E402
from ip2p_jax.train.step import Models, StepConfig  # noqa: E402


def build(args):
    if args.dtype is None:  # bf16 where it is fast; XLA:CPU runs bf16 convolutions slowly
        args.dtype = "fp32" if jax.default_backend() == "cpu" else "bf16"
    dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
    uc = UNetConfig.from_dict(TINY_UNET if args.tiny else SD15_UNET)
    vc = VAEConfig.from_dict(TINY_VAE if args.tiny else SD_VAE)
    tc = CLIPTextConfig.from_dict(TINY_CLIP if args.tiny else CLIP_L)
    models = Models(unet=UNet2DConditionModel(uc, dtype=dtype, attention_impl=args.attention, remat=args.remat),
                    vae=AutoencoderKL(vc, dtype=dtype, attention_impl=args.attention),
                    text_encoder=CLIPTextModel(tc, dtype=dtype, attention_impl=args.attention))
    from ip2p_jax.models import clip, unet, vae

    t0 = time.perf_counter()
    params = {"unet": random_params(unet.abstract_params(uc), 0)}
    vae_p, text_p = random_params(vae.abstract_params(vc), 1), random_params(clip.abstract_params(tc), 2)
    null = jax.jit(models.text_encoder.apply)({"params": text_p}, np.zeros((1, 77), np.int32))
    frozen = {"vae": vae_p, "text_encoder": text_p, "null_embedding": np.asarray(null, np.float32),
              "alphas_cumprod": TrainingSchedule().alphas_cumprod()}
    if args.cached:
        frozen = {k: v for k, v in frozen.items() if k not in ("vae", "text_encoder")}
    info = {"init_s": round(time.perf_counter() - t0, 1),
            "unet_params_m": round(sum(x.size for x in jax.tree.leaves(params)) / 1e6, 1)}
    step_cfg = StepConfig(grad_accum=args.grad_accum, compute_dtype=dtype, scaling_factor=vc.scaling_factor)
    return models, step_cfg, params, frozen, vc, tc, info


def make_batch(args, b: int, vc, tc, rng) -> dict:
    res = 64 if args.tiny else args.res
    if args.cached:
        f = 2 ** (len(vc.block_out_channels) - 1)
        h = res // f
        mom = lambda: np.concatenate([rng.standard_normal((b, h, h, vc.latent_channels)),  # noqa: E731
                                      np.full((b, h, h, vc.latent_channels), -4.0)], -1).astype(np.float32)
        return {"input_moments": mom(), "edited_moments": mom(),
                "text_embedding": rng.standard_normal((b, 77, tc.hidden_size)).astype(np.float32)}
    # uint8 pixels, as training's data sources send them (scaled to [-1, 1] in the step)
    return {"input_image": rng.integers(0, 256, (b, res, res, 3), dtype=np.uint8),
            "edited_image": rng.integers(0, 256, (b, res, res, 3), dtype=np.uint8),
            "input_ids": rng.integers(0, tc.vocab_size, (b, 77)).astype(np.int32)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="small random models (CPU smoke run)")
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--batches", default="16,32,64", help="global batch sizes, ascending")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--mode", default="jit", choices=["jit", "pmap"])
    ap.add_argument("--fsdp", type=int, default=1)
    ap.add_argument("--remat", default="none", choices=["none", "dots", "full"], help="what UNet blocks keep for the backward pass")
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="compute dtype (default: bf16, fp32 on CPU)")
    ap.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn"])
    ap.add_argument("--grad_accum", type=int, default=1)
    ap.add_argument("--cached", action="store_true", help="latent-cache path: no VAE / text encoder in the step")
    args = ap.parse_args()

    models, step_cfg, params, frozen, vc, tc, info = build(args)
    ocfg = st.OptimizerConfig()
    tx, sched = st.make_optimizer(ocfg), st.learning_rate_schedule(ocfg)
    runner = parallel.make_runner(args.mode, models, step_cfg, tx, sched, fsdp=args.fsdp)
    dev = jax.devices()[0]
    head = {"bench": "ip2p_jax-train", "device": dev.device_kind, "tiny": args.tiny, "devices": jax.device_count(),
            "jax": jax.__version__, "mode": args.mode, "fsdp": args.fsdp, "dtype": args.dtype,
            "remat": args.remat, "attention": args.attention, "grad_accum": args.grad_accum,
            "cached": args.cached, "res": 64 if args.tiny else args.res, **info}
    print(json.dumps(head), flush=True)
    state = runner.init_state(params, 0)
    frozen_dev = runner.put_frozen(frozen)
    rng = np.random.default_rng(0)
    for b in [int(x) for x in args.batches.split(",")]:
        try:
            batch = runner.put_batch(make_batch(args, b, vc, tc, rng))
            t0 = time.perf_counter()
            for _ in range(max(1, args.warmup)):
                state, metrics = runner.step(state, frozen_dev, batch)
            jax.block_until_ready(metrics)
            compile_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            for _ in range(args.steps):
                state, metrics = runner.step(state, frozen_dev, batch)
            jax.block_until_ready((state, metrics))
            dt = (time.perf_counter() - t0) / args.steps
            loss = runner.scalars(metrics)["loss"]
            tflops = None if args.tiny else train_gflop_per_example(head["res"], args.cached) * b / dt / 1e3
            print(json.dumps({**head, "batch": b, "ms_per_step": round(dt * 1e3, 2),
                              "examples_per_s": round(b / dt, 2), "peak_mem_gib": peak_memory_gib(),
                              "est_tflops": tflops and round(tflops, 1),
                              "est_tflops_per_device": tflops and round(tflops / jax.device_count(), 1),
                              "mfu": tflops and mfu(tflops / jax.device_count(), head["device"]),
                              "warmup_s": round(compile_s, 1), "loss": round(float(loss), 4)}), flush=True)
        except Exception as e:  # OOM on big batches: report and go on to the next
            msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
            print(json.dumps({**head, "batch": b, "error": msg}), flush=True)
            if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                raise
            state = runner.init_state(params, 0)   # the failed step may have consumed the donated state


if __name__ == "__main__":
    main()
