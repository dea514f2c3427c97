#!/usr/bin/env python
"""Caption stage: turn input captions into {input, edit, output, url} JSONL with a language model.

  python scripts/generate_captions.py --captions laion.parquet --out data/prompts \\
      --backend transformers --model path/to/finetuned-lm --num 10000
  python scripts/generate_captions.py --captions captions.txt --out data/prompts.jsonl \\
      --backend openai --base-url http://localhost:8000/v1 --model my-model
  python scripts/generate_captions.py --export-finetune human-written.jsonl finetune.jsonl

Rerun the same command to resume. For N parallel processes give each the same --seed and
--num-partitions N and its own --partition; --num counts per partition.
See docs/generating_captions.md.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ip2p_jax.datagen import captions as cap  # noqa: E402
from ip2p_jax.datagen.captions.http_backend import OPENAI_BASE_URL  # noqa: E402


def output_file(out: str, partition: int, num_partitions: int) -> str:
    """--out names the JSONL file itself, or a folder that gets one file per partition."""
    if out.endswith(".jsonl"):
        return out
    return os.path.join(out, f"part-{partition:05d}-of-{num_partitions:05d}.jsonl")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--export-finetune", nargs=2, metavar=("HUMAN_JSONL", "OUT_JSONL"),
                   help="only convert human-written {input, edit, output} lines to prompt/completion lines")
    p.add_argument("--captions", help=".txt (one per line), .jsonl, or .parquet file/folder")
    p.add_argument("--caption-column", help="caption field (default: first of caption, TEXT, text, input)")
    p.add_argument("--url-column", help="URL field (default: url or URL if present)")
    p.add_argument("--out", help="output .jsonl file, or a folder for part-PPPPP-of-NNNNN.jsonl files")
    p.add_argument("--backend", choices=["transformers", "openai"])
    p.add_argument("--model", help="model folder (transformers) or model name (openai)")
    p.add_argument("--base-url", default=None, help=f"openai: API base URL (default {OPENAI_BASE_URL})")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="openai: environment variable with the API key")
    p.add_argument("--max-retries", type=int, default=5, help="openai: retries on 429/5xx/network errors")
    p.add_argument("--device", help="transformers: torch device (default cuda if available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="transformers: weights dtype")
    p.add_argument("--num", type=int, default=10000, help="accepted edits wanted in this partition")
    p.add_argument("--partition", type=int, default=0)
    p.add_argument("--num-partitions", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per backend call")
    p.add_argument("--seed", type=int, default=0, help="shuffles the captions and seeds sampling")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--frequency-penalty", type=float, default=0.1)
    p.add_argument("--attempts", type=int, default=4, help="completions tried per caption")
    p.add_argument("--blocklist", help="file of blocked words/phrases (stand-in for moderation)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.export_finetune:
        return args
    for flag in ("captions", "out", "backend", "model"):
        if getattr(args, flag) is None:
            p.error(f"--{flag} is required")
    for flag in ("num", "batch_size", "attempts", "num_partitions", "max_tokens"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.backend == "transformers" and args.base_url:
        p.error("--base-url is for --backend openai")
    return args


def make_backend(args, settings):
    if args.backend == "transformers":
        return cap.make_backend("transformers", model_dir=args.model, settings=settings,
                                device=args.device, dtype=args.dtype)
    return cap.make_backend("openai", base_url=args.base_url or OPENAI_BASE_URL,
                            model=args.model, settings=settings, api_key_env=args.api_key_env,
                            max_retries=args.max_retries)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.export_finetune:
            human, out = args.export_finetune
            print(f"wrote {cap.export_finetune(human, out)} fine-tuning examples to {out}")
            return 0
        rows = cap.read_captions(args.captions, args.caption_column, args.url_column)
        rows = cap.select_partition(rows, args.seed, args.num_partitions, args.partition)
        settings = cap.SamplingSettings(temperature=args.temperature, max_tokens=args.max_tokens,
                                        frequency_penalty=args.frequency_penalty)
        blocklist = cap.WordBlocklist.from_file(args.blocklist) if args.blocklist else None
        backend = make_backend(args, settings)
        path = output_file(args.out, args.partition, args.num_partitions)
        result = cap.run_caption_stage(rows, backend, path, num_samples=args.num, batch_size=args.batch_size,
                                       seed=args.seed, stream=args.partition, max_attempts=args.attempts,
                                       blocklist=blocklist, progress=not args.no_progress)
    except cap.CaptionStageError as e:
        print(f"generate_captions: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("generate_captions: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    reasons = ", ".join(f"{k} {v}" for k, v in result.rejections.most_common()) or "none"
    print(f"{path}: {result.written} edits ({result.new} new); {result.given_up} captions given up, "
          f"{result.duplicates} duplicates skipped; rejected completions: {reasons}")
    if result.written < args.num:
        print(f"captions ran out before {args.num} edits", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
