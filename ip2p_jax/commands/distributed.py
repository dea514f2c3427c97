"""The multi-host launch flags shared by `ip2p train` and `ip2p edit`.

--distributed: jax.distributed.initialize() with cluster auto-detection (TPU pods, SLURM, ...);
--coordinator/--num_processes/--process_id: an explicit launch (any cluster, or processes on one
machine). Without any of them the command runs as one process.
"""
from __future__ import annotations

import argparse

import jax

from ip2p_jax.errors import Ip2pError


class DistributedUsageError(Ip2pError):
    """Multi-host launch flags that do not go together."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--distributed", action="store_true",
                        help="call jax.distributed.initialize() (cluster auto-detection) first")
    parser.add_argument("--coordinator", default=None, help="host:port of process 0 (multi-host without a cluster)")
    parser.add_argument("--num_processes", type=int, default=None)
    parser.add_argument("--process_id", type=int, default=None)


def init_distributed(args) -> None:
    """Join the multi-process job the flags describe (nothing when none are given)."""
    if args.coordinator or args.num_processes or args.process_id is not None:
        if not (args.coordinator and args.num_processes and args.process_id is not None):
            raise DistributedUsageError("--coordinator, --num_processes and --process_id go together")
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    elif args.distributed:
        jax.distributed.initialize()
