#!/usr/bin/env python3
"""The PyTorch peer's editing throughput: diffusers' StableDiffusionInstructPix2PixPipeline timed on
the same shapes as scripts/benchmark_edit.py, in the same call, so the two can be compared as a ratio.

  python scripts/peer_edit.py [--tiny | --model ip2p_jax/demo_model] [--steps 20] [--batches 1,4,16]
        [--res 512] [--compile] [--repeats 3]

Default: random weights of the SD 1.5 InstructPix2Pix architecture (8-channel UNet, SD VAE, CLIP
ViT-L/14 text tower) made in-process, fp16 on a GPU (fp32 on CPU), Euler ancestral, random input
images (never constant ones: constant activations can run faster). The tokenizer is the demo
model's (words map to ids below its vocabulary; the weights are random, so ids carry no meaning).
--compile wraps the UNet in torch.compile (run each batch size in its own process: a second shape
recompiles). --model times a real diffusers folder instead (the CPU side-by-side uses the demo
model). One JSON line per batch: images/s, median seconds, first-call seconds, peak memory.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import CLIP_L, SD15_UNET, SD_VAE, TINY_CLIP, TINY_UNET, TINY_VAE, edit_gflop_per_image, mfu  # noqa: E402,E501

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "ip2p_jax", "demo_model", "tokenizer")



def random_pipeline(tiny: bool, dtype, device):
    from diffusers import (AutoencoderKL, EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET))
    vae = AutoencoderKL(**(TINY_VAE if tiny else SD_VAE))
    text = CLIPTextModel(CLIPTextConfig(**(TINY_CLIP if tiny else CLIP_L)))
    scheduler = EulerAncestralDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                                beta_schedule="scaled_linear")
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=vae, text_encoder=text, tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER), unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return pipe.to(device=device, dtype=dtype)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny random model at 32x32 (CPU, seconds)")
    ap.add_argument("--model", default=None, help="a diffusers folder to time instead of random SD 1.5 weights")
    ap.add_argument("--steps", type=int, default=None, help="default 20 (--tiny: 4)")
    ap.add_argument("--batches", default=None, help="default 1,4,16 (--tiny: 1,2)")
    ap.add_argument("--res", type=int, default=None, help="default 512 (--tiny: 32; --model: its own)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    a.steps = a.steps or (4 if a.tiny else 20)
    a.batches = a.batches or ("1,2" if a.tiny else "1,4,16")

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    if a.model:
        from diffusers import StableDiffusionInstructPix2PixPipeline
        pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(
            a.model, safety_checker=None, requires_safety_checker=False).to(device=device, dtype=dtype)
        res = a.res or pipe.unet.config.sample_size * pipe.vae_scale_factor
    else:
        pipe = random_pipeline(a.tiny, dtype, device)
        res = a.res or (32 if a.tiny else 512)
    if a.compile:
        pipe.unet = torch.compile(pipe.unet, fullgraph=True)
    pipe.set_progress_bar_config(disable=True)
    kind = torch.cuda.get_device_name() if cuda else "cpu"
    info = {"impl": "diffusers" + (" compiled" if a.compile else " eager"), "device": kind, "torch": torch.__version__,
            "dtype": str(dtype).replace("torch.", ""), "steps": a.steps, "res": res, "sampler": "euler_a",
            "tiny": a.tiny, "model": a.model or "random SD 1.5"}
    rng = np.random.default_rng(0)
    for b in [int(x) for x in a.batches.split(",") if x]:
        images = [Image.fromarray(rng.integers(0, 256, (res, res, 3), dtype=np.uint8)) for _ in range(b)]
        kw = dict(prompt=["make it winter"] * b, image=images, num_inference_steps=a.steps, guidance_scale=7.5,
                  image_guidance_scale=1.5, output_type="pil")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            t0 = time.perf_counter()
            pipe(**kw, generator=torch.Generator(device).manual_seed(0))
            first = time.perf_counter() - t0
            times = []
            for r in range(a.repeats):
                t0 = time.perf_counter()
                out = pipe(**kw, generator=torch.Generator(device).manual_seed(r))
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        assert len(out.images) == b
        med = sorted(times)[len(times) // 2]
        tflops = None if (a.tiny or a.model) else b * edit_gflop_per_image(res, a.steps) / med / 1e3
        print(json.dumps({**info, "batch": b, "first_call_s": round(first, 3), "median_s": round(med, 4),
                          "images_per_s": round(b / med, 3), "edit_tflops": tflops and round(tflops, 1),
                          "mfu": mfu(tflops, kind),
                          "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if cuda else None}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
