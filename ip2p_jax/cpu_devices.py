"""On a host without an accelerator, edit on every core: one XLA CPU device per core.

XLA:CPU spreads one program's ops over the cores poorly at the edit's shapes (per-image cost grows
with the batch), while separate devices run their shards of the batch side by side. With one
device per core the edit's batch axis is sharded over them like any mesh (results do not depend
on the device count; see tests/test_pipeline.py). Measured on 2 cores with the demo model (64²,
20 Euler-A steps): batch 16, 2.9 -> 7.0 images/s; batch 1 unchanged (README "Speed").

`use_every_core()` must run before JAX starts its backends (the edit commands, the app, the demo
and the edit benchmark call it first). It leaves XLA alone when XLA_FLAGS already sets a host
device count, when JAX has started, or with IP2P_CPU_DEVICES=1 (or any count: that many devices).
GPU and TPU backends are unaffected: the flag shapes only the host CPU platform.
"""
from __future__ import annotations

import logging
import os

from jax._src import xla_bridge   # importing jax starts no backend: the flag can still be set

from ip2p_jax.errors import Ip2pError

log = logging.getLogger(__name__)

ENV = "IP2P_CPU_DEVICES"
FLAG = "--xla_force_host_platform_device_count"
MAX_DEVICES = 8   # more CPU devices means more padding rows for small batches


class CpuDevicesError(Ip2pError):
    """IP2P_CPU_DEVICES is not a positive integer."""


def host_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def device_count() -> int:
    """The CPU devices to ask for: IP2P_CPU_DEVICES, else one per core up to MAX_DEVICES."""
    value = os.environ.get(ENV, "").strip()
    if not value:
        return max(1, min(MAX_DEVICES, host_cores()))
    if not value.isdigit() or int(value) < 1:
        raise CpuDevicesError(f"{ENV}={value!r}: give a positive number of CPU devices (1: one device)")
    return int(value)


def use_every_core() -> int | None:
    """Set XLA's host device count before JAX starts; returns the count set, or None if left alone."""
    flags = os.environ.get("XLA_FLAGS", "")
    if FLAG in flags or xla_bridge.backends_are_initialized():
        return None
    n = device_count()
    if n == 1:
        return None
    os.environ["XLA_FLAGS"] = f"{flags} {FLAG}={n}".strip()
    log.debug("%d XLA CPU devices (one per core; %s=1 for one)", n, ENV)
    return n
