"""`ip2p export --workdir DIR --out FOLDER`: a run's EMA weights as a complete diffusers folder."""
from __future__ import annotations

import argparse

from ip2p_jax.weights.output_folder import check_output_folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", required=True, help="the training run's workdir (config.json + checkpoints/)")
    parser.add_argument("--out", required=True,
                        help="the diffusers folder to write (a new or empty folder, or an earlier export with --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export at OUT (atomically)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")


def run(args) -> int:
    check_output_folder(args.out, overwrite=args.overwrite, protect=[args.workdir])   # before loading anything
    from ip2p_jax.train.export import export_run   # loads orbax (a root logging handler on import)

    out = export_run(args.workdir, args.out, step=args.step, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0
