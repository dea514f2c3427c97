#!/usr/bin/env python3
"""The PyTorch peer's training step: one InstructPix2Pix update as diffusers' example trainer makes it
(VAE-encode the edited image (sample x scaling factor) and the input image (mode), frozen CLIP text
encoder, noise at a uniform timestep, concatenate the input latents, eps-MSE, AdamW on fp32 params
under bf16 autocast), timed on the same shapes as scripts/benchmark_train.py.

  python scripts/peer_train.py [--tiny] [--res 256] [--batches 16,32,64] [--steps 10] [--compile]

Random weights of the SD 1.5 architecture, random images and token ids. One JSON line per batch:
examples/s, ms per step, estimated TFLOP/s and MFU (the same FLOP count as ours), peak memory.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import CLIP_L, SD15_UNET, SD_VAE, TINY_CLIP, TINY_UNET, TINY_VAE, mfu, train_gflop_per_example  # noqa: E402,E501


def main(argv=None) -> int:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny random models at 32x32 (CPU, seconds)")
    ap.add_argument("--res", type=int, default=None, help="default 256 (--tiny: 32)")
    ap.add_argument("--batches", default=None, help="default 16,32,64 (--tiny: 2,4)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    a = ap.parse_args(argv)
    res = a.res or (32 if a.tiny else 256)
    batches = a.batches or ("2,4" if a.tiny else "16,32,64")
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(TINY_UNET if a.tiny else SD15_UNET)).to(device).train()
    vae = AutoencoderKL(**(TINY_VAE if a.tiny else SD_VAE)).to(device).eval().requires_grad_(False)
    text = CLIPTextModel(CLIPTextConfig(**(TINY_CLIP if a.tiny else CLIP_L))).to(device).eval().requires_grad_(False)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=1e-2)
    model = torch.compile(unet) if a.compile else unet
    scaling = vae.config.scaling_factor
    vocab = text.config.vocab_size
    kind = torch.cuda.get_device_name() if cuda else "cpu"
    head = {"bench": "diffusers-train" + (" compiled" if a.compile else ""), "device": kind, "torch": torch.__version__,
            "res": res, "tiny": a.tiny, "dtype": "bf16 autocast" if cuda else "fp32"}

    def step(edited, original, ids):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            with torch.no_grad():
                latents = vae.encode(edited).latent_dist.sample() * scaling
                image_latents = vae.encode(original).latent_dist.mode()
                context = text(ids)[0]
            noise = torch.randn_like(latents)
            t = torch.randint(0, 1000, (latents.shape[0],), device=device)
            noisy = sched.add_noise(latents, noise, t)
            pred = model(torch.cat([noisy, image_latents], dim=1), t, context).sample
            loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for b in [int(x) for x in batches.split(",")]:
        edited, original = (torch.randn(b, 3, res, res, device=device).clamp(-1, 1) for _ in range(2))
        ids = torch.randint(0, vocab, (b, 77), device=device)
        try:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            for _ in range(a.warmup):
                step(edited, original, ids)
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(a.steps):
                loss = step(edited, original, ids)
            if cuda:
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) / a.steps
            tflops = None if a.tiny else train_gflop_per_example(res, cached=False) * b / dt / 1e3
            print(json.dumps({**head, "batch": b, "ms_per_step": round(dt * 1e3, 2), "examples_per_s": round(b / dt, 2),
                              "est_tflops": tflops and round(tflops, 1), "mfu": mfu(tflops, kind),
                              "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if cuda else None,
                              "loss": round(float(loss), 4)}), flush=True)
        except torch.cuda.OutOfMemoryError as e:
            print(json.dumps({**head, "batch": b, "error": str(e).splitlines()[0][:300]}), flush=True)
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
