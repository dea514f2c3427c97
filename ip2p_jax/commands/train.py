"""`ip2p train --config configs/train.py:PRESET --workdir DIR [--config.key=value ...]`.

Running the same command again resumes from the workdir's latest checkpoint. Multi-host: pass
--distributed (auto-detected cluster) or --coordinator/--num_processes/--process_id.
"""
from __future__ import annotations

import argparse

from ip2p_jax.commands import distributed
from ip2p_jax.train.configs import apply_overrides, load_config, split_overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE[:PRESET]",
                        help="ml_collections config file and preset, e.g. configs/train.py:sd15; "
                             "override any setting with --config.key=value")
    parser.add_argument("--workdir", required=True, help="checkpoints, TensorBoard logs and the export go here")
    distributed.add_arguments(parser)
    # `--config.a.b=v` tokens are not argparse options: collect them before argparse sees the rest.
    parse_known = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        overrides, rest = split_overrides(list(args) if args is not None else [])
        ns, extras = parse_known(rest, namespace)
        ns.config_overrides = list(getattr(ns, "config_overrides", None) or []) + overrides
        return ns, extras

    parser.parse_known_args = parse_known_args


def run(args) -> int:
    # the training loop loads orbax, which installs a root logging handler on import: this command only
    from ip2p_jax.train.loop import show_progress_logs, train

    show_progress_logs()   # the progress lines are log records (unless the CLI has set up logging)

    config = apply_overrides(load_config(args.config), getattr(args, "config_overrides", []))
    distributed.init_distributed(args)
    result = train(config, args.workdir)
    if result.preempted:
        print(f"stopped at step {result.step}; run the same command again to resume")
    return 0
