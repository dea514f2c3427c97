"""Shared by test_pipeline.py and test_edit_cli.py: one tiny diffusers folder per test run,
built once even when pytest-xdist workers ask for it at the same time.

Every edit in these tests uses the same shapes (24x32 images, 3 steps, batch_size=4, any
sampler): pipelines of one model share their compiled edit, so one compile per process
serves them all.
"""
from __future__ import annotations

import fcntl
import os
import shutil

import numpy as np
from PIL import Image

import tiny

H, W, STEPS, BATCH = 24, 32, 3, 4
INSTRUCTION = "make it winter"


def shared_root(tmp_path_factory) -> str:
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent   # the run's directory, common to all workers
    return str(root)


def tiny_model_dir(tmp_path_factory) -> str:
    root = shared_root(tmp_path_factory)
    path = os.path.join(root, "tiny_ip2p")
    with open(os.path.join(root, "tiny_ip2p.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(os.path.join(path, "model_index.json")):
            tmp = f"{path}.{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tiny.save_pipeline(tmp, seed=3)
            os.replace(tmp, path)
    return path


def sample_images(n: int = 3) -> list:
    return [Image.fromarray(tiny.random_image(H, W, seed=i)) for i in range(n)]


def max_mean_abs(a, b) -> tuple[float, float]:
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return float(d.max()), float(d.mean())
