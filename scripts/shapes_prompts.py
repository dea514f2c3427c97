#!/usr/bin/env python
"""Stage (a) of the shapes world: write N instruction prompts as the authors' JSONL.

  python scripts/shapes_prompts.py --num 10000 --seed 0 --out data/shapes/prompts.jsonl

Each line: {"input": caption, "edit": instruction, "output": edited caption,
"url": "shapes://<seed>/<i>"}. Lines are distinct and deterministic in --seed.
Positions are not stored: stage (b) derives them from each image seed (see
ip2p_jax/datagen/shapes/world.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None) -> int:
    from tqdm.auto import tqdm

    from ip2p_jax.datagen.shapes import generate_prompts
    from ip2p_jax.datagen.shapes.world import SceneError

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num", type=int, required=True, help="number of prompt lines")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="JSONL file to write (replaced atomically)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.num < 1:
        p.error("--num must be >= 1")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = f"{args.out}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            for line in tqdm(generate_prompts(args.num, args.seed), total=args.num, desc="shapes prompts",
                             unit="prompt", disable=args.no_progress):
                f.write(json.dumps(line) + "\n")
        os.replace(tmp, args.out)
    except SceneError as e:
        print(f"shapes_prompts: error: {e}", file=sys.stderr)
        return 2
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"wrote {args.num} prompts to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
