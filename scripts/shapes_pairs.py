#!/usr/bin/env python
"""Stage (b) of the shapes world: render each prompt's pair(s) into the authors' layout.

  python scripts/shapes_pairs.py --prompts data/shapes/prompts.jsonl --out data/shapes/pairs \\
      --samples-per-prompt 2 --resolution 64

Writes <out>/<7-digit prompt index>/{prompt.json, <seed>_0.jpg, <seed>_1.jpg, metadata.jsonl}
and <out>/seeds.json. Resumable: finished prompt dirs are skipped, a killed run leaves
nothing that counts as finished. Build a TFDS dataset from it with
`scripts/build_tfds.py --format authors --source <out> --data-dir ...`.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None) -> int:
    from ip2p_jax.datagen.shapes import read_prompts, write_pairs
    from ip2p_jax.datagen.shapes.render import RESOLUTIONS
    from ip2p_jax.datagen.shapes.world import SceneError

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", required=True, help="JSONL from scripts/shapes_prompts.py")
    p.add_argument("--out", required=True, help="output folder (the authors' layout)")
    p.add_argument("--samples-per-prompt", type=int, default=1, help="image seeds (pairs) per prompt")
    p.add_argument("--seed", type=int, default=0, help="base seed the image seeds derive from")
    p.add_argument("--resolution", type=int, default=64, choices=RESOLUTIONS)
    p.add_argument("--quality", type=int, default=95, help="JPEG quality")
    p.add_argument("--workers", type=int, default=1, help="processes")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.samples_per_prompt < 1:
        p.error("--samples-per-prompt must be >= 1")
    start = time.perf_counter()
    try:
        stats = write_pairs(read_prompts(args.prompts), args.out, args.samples_per_prompt, args.seed,
                            args.resolution, args.quality, args.workers, progress=not args.no_progress)
    except (SceneError, OSError) as e:
        print(f"shapes_pairs: error: {e}", file=sys.stderr)
        return 2
    secs = time.perf_counter() - start
    new_pairs = stats.written * args.samples_per_prompt
    print(f"{stats.written} prompt dirs written, {stats.skipped} already finished; "
          f"{stats.pairs} pairs in {args.out}/seeds.json; {new_pairs / max(secs, 1e-9):.0f} new pairs/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
