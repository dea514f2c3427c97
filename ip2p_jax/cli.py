"""`ip2p` console script: argument parsing only; every command is a library call.

Each subcommand lives in ip2p_jax/commands/<name>.py and provides
`add_arguments(parser)` and `run(args) -> int` (the exit code). The CLI installs the logging handler
(library code only logs) and turns the project's own errors (`Ip2pError`: bad input or settings)
into one line on stderr and exit status 2; any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import logging
import sys

from ip2p_jax import cpu_devices, sharding
from ip2p_jax.commands import app, convert, edit, export, train
from ip2p_jax.errors import Ip2pError

COMMANDS = {
    "edit": (edit, "edit images from written instructions"),
    "convert": (convert, "convert weights (diffusers folder, single file, hub id) to a folder ip2p_jax and "
                         "diffusers load"),
    "train": (train, "train or fine-tune an InstructPix2Pix model"),
    "export": (export, "write a training run's EMA weights as a complete diffusers folder"),
    "app": (app, "the web UI for editing (needs the [app] extra: gradio)"),
}
EDITING = ("edit", "app")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ip2p", description="InstructPix2Pix in JAX/Flax")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", dest="log_level", action="store_const", const=logging.DEBUG,
                           default=logging.INFO, help="log debug messages too")
    verbosity.add_argument("-q", "--quiet", dest="log_level", action="store_const", const=logging.WARNING,
                           help="log warnings and errors only")
    parser.add_argument("--no-compile-cache", action="store_true",
                        help="do not keep compiled programs on disk (default: on, in $IP2P_COMPILE_CACHE or "
                             "~/.cache/ip2p_jax/xla; IP2P_COMPILE_CACHE=0 also turns it off)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_command=module)
        module.add_arguments(p)
    return parser


_handler: logging.Handler | None = None


def configure_logging(level: int) -> None:
    """ip2p_jax's log records at `level` and up (other libraries' at WARNING) to stderr, one handler
    however often this runs (each run binds the current sys.stderr)."""
    global _handler
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if level <= logging.DEBUG
                                            else "%(message)s"))
    root.addHandler(_handler)
    logging.getLogger("ip2p_jax").setLevel(level)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    if not args.no_compile_cache:
        sharding.default_compilation_cache()
    try:
        if args.command in EDITING:   # CPU-only hosts: a device per core (ip2p_jax.cpu_devices)
            cpu_devices.use_every_core()
        return int(args._command.run(args) or 0)
    except Ip2pError as e:  # bad input or settings: the message says what and where
        print(f"ip2p {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
