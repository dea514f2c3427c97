"""`ip2p` console script: argument parsing only; every command is a library call.

Each subcommand lives in ip2p_jax/commands/<name>.py and provides
`add_arguments(parser)` and `run(args) -> int` (the exit code).
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "edit": "edit images from written instructions",
    "convert": "convert weights (diffusers folder, single file, hub id) to a folder ip2p_jax and diffusers load",
    "train": "train or fine-tune an InstructPix2Pix model",
    "export": "write a training run's EMA weights as a complete diffusers folder",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ip2p", description="InstructPix2Pix in JAX/Flax")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=f"ip2p_jax.commands.{name}")
        try:
            importlib.import_module(f"ip2p_jax.commands.{name}").add_arguments(p)
        except ModuleNotFoundError as e:
            if e.name != f"ip2p_jax.commands.{name}":
                raise
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # our errors are ValueError subclasses with clear messages
        print(f"ip2p {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
