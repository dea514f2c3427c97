"""Shared by the multi-process tests: fast XLA:CPU compile flags for their subprocesses, waiting for them, and
module fixtures computed once per test run even when pytest-xdist spreads a module's tests over
several workers (the first worker computes under a file lock, the others read its JSON result)."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONFIG = os.path.join(ROOT, "configs", "train.py")
# O0 LLVM and the classic fusion emitters: the tiny train step compiles in ~5 s instead of ~40 s.
FAST_XLA = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def subprocess_env(devices: int = 1, cache_dir: str | None = None) -> dict:
    flags = FAST_XLA if devices == 1 else f"--xla_force_host_platform_device_count={devices} {FAST_XLA}"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags, PYTHONUNBUFFERED="1")
    if cache_dir:  # processes running the same program share its compiled executable
        env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the coordinator of a two-process test, a test server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finish(procs, timeout: float = 300) -> list[str]:
    """Wait for subprocesses started together; their outputs (each must exit 0; all killed on a timeout)."""
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
    return outputs


def worker_result(script: str, args: list, out: str, *, devices: int = 1, timeout: float = 900) -> dict:
    """Run `python script *args` (a test module's worker) and return the JSON it wrote to `out`."""
    proc = subprocess.run([sys.executable, script, *args], env=subprocess_env(devices=devices), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out) as f:
        return json.load(f)


def logged_writes(log) -> list:
    """The JSON lines a test's worker logged, one tuple per line ([] if it never wrote)."""
    return [tuple(json.loads(x)) for x in open(log).read().splitlines()] if os.path.exists(log) else []


def _run_root(tmp_path_factory) -> str:
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent   # common to all workers of this run
    return str(root)


def run_once(tmp_path_factory, name: str, compute: Callable[[str], dict]) -> dict:
    """compute(folder) -> JSON-able dict, once per test run; later callers get the stored result."""
    root = _run_root(tmp_path_factory)
    folder = os.path.join(root, f"train_{name}")
    with open(os.path.join(root, f"train_{name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = os.path.join(folder, "result.json")
        if os.path.exists(done):
            with open(done) as f:
                return json.load(f)
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        result = compute(folder)
        with open(done + ".tmp", "w") as f:
            json.dump(result, f)
        os.replace(done + ".tmp", done)
        return result


def tokenizer_dir(folder: str) -> str:
    import tiny

    path = os.path.join(folder, "tok")
    tiny.tokenizer_files(path)
    return path


def tiny_config(tokenizer: str, **overrides):
    """configs/train.py:tiny with a tokenizer; overrides as section__key=value."""
    from ip2p_jax.train.configs import load_config

    c = load_config(CONFIG + ":tiny")
    c.model.tokenizer = tokenizer
    for key, value in overrides.items():
        section, name = key.split("__")
        c[section][name] = value
    return c
