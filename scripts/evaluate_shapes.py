#!/usr/bin/env python
"""Score an editing model on held-out shapes-world edits, beside the identity baseline.

  python scripts/evaluate_shapes.py --model runs/shapes/export --num 300 --seed 1000 --steps 20

Renders --num scenes + instructions from --seed (use a seed the training prompts did not
use, or pass --exclude with the training prompts), edits them with
ip2p_jax.pipeline.EditPipeline, scores each edit per type (see
ip2p_jax/datagen/shapes/score.py), prints a table, and prints one JSON object last.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ip2p_jax.errors import Ip2pError  # noqa: E402  (after the path set-up above)


def parse_args(argv=None):
    from ip2p_jax.datagen.shapes.render import RESOLUTIONS
    from ip2p_jax.diffusion.samplers import SAMPLERS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model folder or checkpoint EditPipeline.from_pretrained reads")
    p.add_argument("--num", type=int, default=300, help="held-out examples")
    p.add_argument("--seed", type=int, default=1000, help="prompt/image seed of the held-out set and edit seed")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--text-scale", type=float, default=7.5)
    p.add_argument("--image-scale", type=float, default=1.5)
    p.add_argument("--sampler", default="euler_a", choices=SAMPLERS)
    p.add_argument("--batch-size", type=int, default=None, help="edits per compiled call (pipeline default)")
    p.add_argument("--resolution", type=int, default=64, choices=RESOLUTIONS)
    p.add_argument("--exclude", default=None, help="prompts JSONL (training) whose captions to leave out")
    p.add_argument("--autoencoder-ceiling", action="store_true",
                   help="also score the expected outputs passed through the model's VAE (a perfect editor's score)")
    p.add_argument("--save", default=None, help="folder for edited images and per-example scores")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.num < 1:
        p.error("--num must be >= 1")
    return args


def main(argv=None) -> int:
    from ip2p_jax.datagen.shapes import format_table, read_prompts
    from ip2p_jax.datagen.shapes.evaluate import autoencoder_ceiling, evaluate, held_out_examples, summary
    from ip2p_jax.datagen.shapes.score import aggregate

    args = parse_args(argv)
    try:
        exclude = read_prompts(args.exclude) if args.exclude else ()
        examples = held_out_examples(args.num, args.seed, args.resolution, exclude)
        from ip2p_jax.pipeline import EditPipeline

        pipe = EditPipeline.from_pretrained(args.model)
    except Ip2pError as e:
        print(f"evaluate_shapes: error: {e}", file=sys.stderr)
        return 2

    def edit_fn(images, instructions):
        result = pipe.edit(images, instructions, steps=args.steps, text_scale=args.text_scale,
                           image_scale=args.image_scale, sampler=args.sampler, seed=args.seed, resolution=args.resolution,
                           batch_size=args.batch_size, progress=not args.no_progress)
        return result.images

    scores, edited = evaluate(edit_fn, examples, progress=not args.no_progress)
    if args.autoencoder_ceiling:
        scores["autoencoder"] = autoencoder_ceiling(pipe.autoencode, examples, progress=not args.no_progress)
    if args.save:
        _save(args.save, examples, edited, scores)
    print(format_table({m: aggregate(rows) for m, rows in scores.items()}))
    out = summary(scores)
    out["settings"] = {k: getattr(args, k) for k in
                       ("model", "num", "seed", "steps", "sampler", "text_scale", "image_scale", "resolution")}
    print(json.dumps(out))
    return 0


def _save(folder, examples, edited, scores):
    """<i>_input.png, <i>_edited.png, <i>_expected.png and scores.jsonl."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "scores.jsonl"), "w") as f:
        for i, (e, img, m, ident) in enumerate(zip(examples, edited, scores["model"], scores["identity"])):
            e.input_image().save(os.path.join(folder, f"{i:05d}_input.png"))
            img.save(os.path.join(folder, f"{i:05d}_edited.png"))
            e.output_image().save(os.path.join(folder, f"{i:05d}_expected.png"))
            f.write(json.dumps({"index": i, "prompt": e.prompt, "seed": e.seed, "model": m,
                                "identity": ident}) + "\n")


if __name__ == "__main__":
    sys.exit(main())
