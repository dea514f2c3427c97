"""ip2p_jax.cpu_devices: a CPU-only host edits with one XLA device per core (the CLI's edit
commands, the app, the demo), unless told otherwise or already configured."""
from __future__ import annotations

import subprocess
import sys

import pytest

from ip2p_jax import cpu_devices

PROBE = ("import jax; from ip2p_jax import cpu_devices; n = cpu_devices.use_every_core(); "
         "print(n, jax.device_count())")


def _probe(env_extra, monkeypatch_env):
    env = {k: v for k, v in monkeypatch_env.items() if k not in ("XLA_FLAGS", cpu_devices.ENV)}
    env.update(env_extra, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()


def test_one_device_per_core_before_jax_starts():
    import os

    env = dict(os.environ)
    assert _probe({cpu_devices.ENV: "3"}, env) == ["3", "3"]
    assert _probe({cpu_devices.ENV: "1"}, env) == ["None", "1"]
    # an explicit XLA device count wins
    assert _probe({"XLA_FLAGS": f"{cpu_devices.FLAG}=2", cpu_devices.ENV: "3"}, env) == ["None", "2"]


def test_device_count_follows_the_host(monkeypatch):
    monkeypatch.delenv(cpu_devices.ENV, raising=False)
    for cores, want in ((1, 1), (2, 2), (64, cpu_devices.MAX_DEVICES)):
        monkeypatch.setattr(cpu_devices, "host_cores", lambda n=cores: n)
        assert cpu_devices.device_count() == want
    monkeypatch.setenv(cpu_devices.ENV, "zero")
    with pytest.raises(cpu_devices.CpuDevicesError, match="IP2P_CPU_DEVICES='zero'"):
        cpu_devices.device_count()


def test_started_jax_is_left_alone():
    import jax

    jax.devices()
    assert cpu_devices.use_every_core() is None


def test_cpu_calls_hold_two_rows_per_device():
    """On CPU devices a request is split into calls of CPU_PER_DEVICE_BATCH rows per device (the
    measured best there); an explicit batch_size is kept."""
    import types

    import jax
    import numpy as np

    from ip2p_jax import pipeline as P

    fake = types.SimpleNamespace(mesh=types.SimpleNamespace(devices=np.array(jax.devices()[:1])), num_devices=1)
    assert P.EditPipeline._call_size(fake, 16, None) == P.CPU_PER_DEVICE_BATCH
    assert P.EditPipeline._call_size(fake, 1, None) == 1
    assert P.EditPipeline._call_size(fake, 16, 16) == 16
