#!/usr/bin/env python
"""The paper's CLIP evaluation: sweep guidance scales, edit every example, score with CLIP.

  python scripts/evaluate_clip.py --model timbrooks-instruct-pix2pix --clip clip-vit-large-patch14 \\
      --jsonl examples.jsonl --text-scales 7.5 --image-scales 1.0,1.2,1.4,1.6,1.8,2.0,2.2 \\
      --steps 20 --seed 0 --out results.jsonl

Examples: `--jsonl` lines {"image": path (relative to the file's folder), "edit": instruction,
"input": input caption, "output": edited caption}, or a built TFDS edit-pairs dataset
(`--tfds DATA_DIR --tfds-name NAME --split test`, or `--tfds VERSION_DIR`). Every (text scale,
image scale) pair edits all examples with the same seeds (output i gets seed + i), then the
means of sim_direction, sim_image, sim_0, sim_1 (ip2p_jax.metrics.clip_scores) are printed as
one row and appended to --out as one JSON line. One JSON object with every row comes last.
Bad inputs: one error line, exit status 2.
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ip2p_jax.errors import Ip2pError  # noqa: E402  (after the path set-up above)

PROG = "evaluate_clip"
FIELDS = ("image", "edit", "input", "output")


class ExampleError(Ip2pError):
    """An example file or dataset that cannot be used; the message names the file and line."""


def _scales(text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one number")
    return vals


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="editing model: what EditPipeline.from_pretrained reads")
    p.add_argument("--clip", required=True, help="transformers CLIPModel folder (e.g. clip-vit-large-patch14)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--jsonl", help="examples: lines with image, edit, input, output")
    src.add_argument("--tfds", help="built TFDS edit-pairs data dir (with --tfds-name) or version folder")
    p.add_argument("--tfds-name", default=None, help="dataset name under --tfds")
    p.add_argument("--split", default="test", help="TFDS split (default: test)")
    p.add_argument("--num", type=int, default=None, help="use the first N examples (default: all)")
    p.add_argument("--text-scales", type=_scales, default=[7.5], help="comma-separated (default: 7.5)")
    p.add_argument("--image-scales", type=_scales, default=[1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.2],
                   help="comma-separated (default: 1.0,1.2,...,2.2)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default=None, help="default: the model's (euler_a; edm_euler for EDM models)")
    p.add_argument("--seed", type=int, default=0, help="output i of every pair gets seed + i")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=None, help="edits per compiled call (pipeline default)")
    p.add_argument("--dtype", default=None, help="editor dtype: fp32, bf16, fp16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--clip-batch-size", type=int, default=32)
    p.add_argument("--out", default="results.jsonl", help="JSONL file the rows are appended to")
    p.add_argument("--per-example", action="store_true", help="also store per-example scores in each row")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.num is not None and args.num < 1:
        p.error("--num must be >= 1")
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if args.clip_batch_size < 1:
        p.error("--clip-batch-size must be >= 1")
    if args.tfds_name and not args.tfds:
        p.error("--tfds-name needs --tfds")
    return args


# ---------------------------------------------------------------------------- examples

def read_jsonl(path: str, num: int | None = None) -> list[dict]:
    """Examples {"image": PIL RGB, "edit", "input", "output", "name"} from a JSONL file."""
    from ip2p_jax import images as imlib, jsonl

    if not os.path.isfile(path):
        raise ExampleError(f"{path}: no such file")
    folder = os.path.dirname(os.path.abspath(path))
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, rec in itertools.islice(jsonl.objects(f, path, ExampleError), num):
            where = f"{path}:{lineno}"
            bad = [k for k in FIELDS if not isinstance(rec.get(k), str) or not rec[k].strip()]
            if bad:
                raise ExampleError(f"{where}: needs non-empty string fields {', '.join(FIELDS)}; "
                                   f"missing or empty: {', '.join(bad)}")
            image_path = os.path.join(folder, os.path.expanduser(rec["image"]))
            try:
                image = imlib.load_image(image_path)
            except imlib.ImageError as e:
                raise ExampleError(f"{where}: {e}") from None
            out.append({"image": image, "edit": rec["edit"], "input": rec["input"], "output": rec["output"],
                        "name": rec["image"]})
    if not out:
        raise ExampleError(f"{path}: no examples")
    return out


def read_tfds(path: str, name: str | None, split: str, num: int | None = None) -> list[dict]:
    """Examples from a built TFDS edit-pairs dataset (ip2p_jax.data.builder.open_dataset)."""
    from PIL import Image

    from ip2p_jax import images as imlib
    from ip2p_jax.data.builder import encoded_source, open_dataset

    builder = open_dataset(path, name)
    where = builder.data_dir
    if split not in builder.info.splits:
        raise ExampleError(f"{where}: no split {split!r} (it has: {', '.join(sorted(builder.info.splits))})")
    source = encoded_source(builder, split)
    n = len(source) if num is None else min(num, len(source))
    if n == 0:
        raise ExampleError(f"{where}: split {split!r} is empty")
    text = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)  # noqa: E731
    out = []
    for i in range(n):
        rec = source[i]
        ex_name = f"{split}[{i}] ({text(rec['id'])})"
        ex = {"edit": text(rec["instruction"]), "input": text(rec["input_caption"]),
              "output": text(rec["edited_caption"]), "name": ex_name}
        empty = [k for k in ("input", "output") if not ex[k].strip()]
        if empty:
            raise ExampleError(f"{where}: {ex_name} has no {' / '.join(empty)} caption; the CLIP metrics need "
                               "input and edited captions")
        try:
            ex["image"] = imlib.to_rgb(Image.open(io.BytesIO(rec["input_image"])), name=ex_name)
        except OSError as e:
            raise ExampleError(f"{where}: {ex_name}: cannot decode the input image ({e})") from None
        out.append(ex)
    return out


# ---------------------------------------------------------------------------- the sweep

def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        examples = (read_jsonl(args.jsonl, args.num) if args.jsonl
                    else read_tfds(args.tfds, args.tfds_name, args.split, args.num))
        from ip2p_jax.metrics.clip_scores import ClipScorer, mean_scores, scores_from_features
        from ip2p_jax.pipeline import EditPipeline

        scorer = ClipScorer.from_pretrained(args.clip, batch_size=args.clip_batch_size)
        pipe = EditPipeline.from_pretrained(args.model, dtype=args.dtype)
        args.sampler = args.sampler or pipe.default_sampler
        pipe.plan(args.sampler, args.steps)   # checks sampler and steps before any work
        out_dir = os.path.dirname(os.path.abspath(args.out))
        os.makedirs(out_dir, exist_ok=True)
        inputs = [e["image"] for e in examples]
        names = [e["name"] for e in examples]
        image_0 = scorer.image_features(inputs, names=names)
        text = scorer.text_features([e["input"] for e in examples] + [e["output"] for e in examples])
    except (Ip2pError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    text_0, text_1 = text[:len(examples)], text[len(examples):]
    from tqdm import tqdm

    settings = {"model": args.model, "clip": args.clip, "examples": args.jsonl or args.tfds, "num": len(examples),
                "steps": args.steps, "sampler": args.sampler, "seed": args.seed, "resolution": args.resolution,
                "dtype": pipe.dtype.name}
    pairs = list(itertools.product(args.text_scales, args.image_scales))
    rows = []
    bar = tqdm(pairs, desc="guidance pairs", unit="pair", disable=args.no_progress)
    tqdm.write(f"{'text':>6} {'image':>6} {'sim_direction':>14} {'sim_image':>10} {'sim_0':>8} {'sim_1':>8}"
               f" {'s':>7}", file=sys.stdout)
    try:
        for text_scale, image_scale in bar:
            start = time.perf_counter()
            result = pipe.edit(inputs, [e["edit"] for e in examples], steps=args.steps, text_scale=text_scale,
                               image_scale=image_scale, sampler=args.sampler, seed=args.seed,
                               resolution=args.resolution, batch_size=args.batch_size, names=names, progress=False)
            scores = scores_from_features(image_0, scorer.image_features(result.images), text_0, text_1)
            row = {"text_scale": text_scale, "image_scale": image_scale, **mean_scores(scores), **settings,
                   "seconds": round(time.perf_counter() - start, 3)}
            if args.per_example:
                row["per_example"] = {k: [float(x) for x in v] for k, v in scores.items()}
            with open(args.out, "a") as f:   # each finished pair is on disk at once
                f.write(json.dumps(row) + "\n")
            rows.append(row)
            tqdm.write(f"{text_scale:6.2f} {image_scale:6.2f} {row['sim_direction']:14.4f} {row['sim_image']:10.4f}"
                       f" {row['sim_0']:8.4f} {row['sim_1']:8.4f} {row['seconds']:7.1f}", file=sys.stdout)
    except Ip2pError as e:
        bar.close()
        print(f"{PROG}: error: {e} ({len(rows)} of {len(pairs)} pairs done, in {args.out})", file=sys.stderr)
        return 2
    bar.close()
    print(json.dumps({"rows": [{k: r[k] for k in r if k not in settings} for r in rows], "settings": settings,
                      "out": args.out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
