#!/usr/bin/env python
"""Image stage of the InstructPix2Pix data: sample each prompt's image pairs with Stable Diffusion
and Prompt-to-Prompt, CLIP-filter them, write the authors' layout.

  python scripts/generate_pairs.py --model path/to/stable-diffusion-v1-5 --prompts prompts.jsonl \\
      --out data/pairs --clip-model path/to/clip-vit-large-patch14 --steps 25

Writes <out>/<7-digit prompt index>/{prompt.json, <seed>_0.jpg, <seed>_1.jpg, metadata.jsonl},
<out>/seeds.json and <out>/generation.json. Resumable: finished prompt dirs are skipped and a
killed run loses nothing finished. Split work with --partition/--num-partitions (the authors'
contiguous parts) and/or --start/--end, or run one job over many hosts (--distributed, or
--coordinator/--num_processes/--process_id, as `ip2p train`): every process then samples its
own share of the prompts on its own devices and writes their dirs. See docs/generating_pairs.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="text-to-image Stable Diffusion: diffusers folder or single file")
    p.add_argument("--prompts", required=True, help="JSONL with text keys input, edit, output (one prompt a line)")
    p.add_argument("--out", required=True, help="output folder (the authors' layout)")
    p.add_argument("--clip-model", help="transformers CLIPModel folder (ViT-L/14 as the authors); without it "
                                        "nothing is filtered and only --keep candidates per prompt are sampled")
    p.add_argument("--samples-per-prompt", type=int, default=100, help="candidates sampled per prompt")
    p.add_argument("--keep", type=int, default=4, help="at most this many pairs kept per prompt")
    p.add_argument("--steps", type=int, default=100, help="sampling steps (the authors' README suggests 25 for speed)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--seed", type=int, default=0, help="base seed: candidate seeds derive from it and the prompt index")
    p.add_argument("--min-p2p", type=float, default=0.1,
                   help="fraction of steps with self-attention injection ~ U[min, max]")
    p.add_argument("--max-p2p", type=float, default=0.9)
    p.add_argument("--min-cfg", type=float, default=7.5, help="classifier-free guidance scale ~ U[min, max]")
    p.add_argument("--max-cfg", type=float, default=15.0)
    p.add_argument("--clip-threshold", type=float, default=0.2, help="min image-caption similarity of each image")
    p.add_argument("--clip-dir-threshold", type=float, default=0.2, help="min directional similarity")
    p.add_argument("--clip-img-threshold", type=float, default=0.7, help="min image-image similarity")
    p.add_argument("--partition", type=int, default=0, help="which of --num-partitions contiguous parts to do")
    p.add_argument("--num-partitions", type=int, default=1)
    p.add_argument("--start", type=int, default=0, help="first prompt index (before partitioning)")
    p.add_argument("--end", type=int, default=None, help="prompt index to stop before")
    p.add_argument("--batch-size", type=int, default=None, help="pairs per compiled call (default 4 per device)")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default bf16 on GPU/TPU, fp32 on CPU)")
    p.add_argument("--quality", type=int, default=100, help="JPEG quality (the authors': 100)")
    p.add_argument("--no-progress", action="store_true")
    from ip2p_jax.commands import distributed
    distributed.add_arguments(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from ip2p_jax.datagen.image_pairs import (ClipFilter, PairSampler, PairSettings, generate_pairs,
                                              partition_indices, read_prompts)

    settings = PairSettings(steps=args.steps, samples_per_prompt=args.samples_per_prompt, keep=args.keep,
                            resolution=args.resolution, p2p_range=(args.min_p2p, args.max_p2p),
                            cfg_range=(args.min_cfg, args.max_cfg), seed=args.seed, jpeg_quality=args.quality,
                            clip_filter=ClipFilter(args.clip_threshold, args.clip_dir_threshold,
                                                   args.clip_img_threshold))
    from ip2p_jax.commands import distributed

    start = time.perf_counter()
    try:
        distributed.init_distributed(args)
        settings.check()
        if args.batch_size is not None and args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        prompts = read_prompts(args.prompts)
        indices = partition_indices(len(prompts), args.partition, args.num_partitions, args.start, args.end)
        scorer = None
        if args.clip_model:
            from ip2p_jax.metrics.clip_scores import ClipScorer
            scorer = ClipScorer.from_pretrained(args.clip_model)
        else:
            print("generate_pairs: no --clip-model: pairs are not CLIP-filtered; sampling only --keep "
                  f"({args.keep}) candidates per prompt", file=sys.stderr)
        sampler = PairSampler.from_pretrained(args.model, dtype=args.dtype)
        import jax
        who = f"process {jax.process_index()} of {jax.process_count()}: " if jax.process_count() > 1 else ""
        print(f"generate_pairs: {who}prompts {indices.start}..{indices.stop - 1} of {len(prompts)} "
              f"(partition {args.partition + 1}/{args.num_partitions}), {sampler.num_devices} device(s), "
              f"{sampler.dtype.name}", file=sys.stderr)
        stats = generate_pairs(sampler, prompts, args.out, settings, scorer=scorer, indices=indices,
                               batch_size=args.batch_size, progress=not args.no_progress,
                               run_info={"model": args.model, "clip_model": args.clip_model, "prompts": args.prompts})
    except (ValueError, OSError) as e:
        print(f"generate_pairs: error: {e}", file=sys.stderr)
        return 2
    secs = time.perf_counter() - start
    print(f"{who}{stats.written} prompt dirs written ({stats.kept} pairs kept of {stats.sampled} sampled), "
          f"{stats.skipped} already finished; {stats.total_pairs} pairs in {args.out}/seeds.json; "
          f"{stats.sampled / max(secs, 1e-9):.2f} pairs sampled/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
