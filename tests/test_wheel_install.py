"""The package as a user installs it: build the wheel, install it into a fresh virtual environment
with only its declared dependencies (versions held to the tested set in requirements-test.txt, no
torch), then run the newcomer's commands from a folder outside the checkout: the README's edit of
the examples with the shipped demo model (no extra flags), the tiny training preset twice (the
second run resumes), and an export. `make test-wheel` runs it (CI runs it as its own step).
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import pytest

from PIL import Image

pytestmark = pytest.mark.wheel
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd, cwd, timeout=900, **env):
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "PYTHONPATH": "", **env})
    assert result.returncode == 0, f"{' '.join(map(str, cmd))}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the venv's bin folder, a work folder holding copies of examples/ and configs/)."""
    base = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(base / "dist"), ROOT], cwd=base)
    wheel, = glob.glob(str(base / "dist" / "ip2p_jax-*.whl"))
    _run([sys.executable, "-m", "venv", str(base / "venv")], cwd=base)
    bin_dir = base / "venv" / "bin"
    _run([bin_dir / "pip", "install", "-q", wheel, "-c", os.path.join(ROOT, "requirements-test.txt")], cwd=base)
    work = base / "work"
    work.mkdir()
    for folder in ("examples", "configs"):
        shutil.copytree(os.path.join(ROOT, folder), work / folder)
    return bin_dir, work


def test_the_installed_package_is_the_one_used(installed):
    bin_dir, work = installed
    where = _run([bin_dir / "python", "-c", "import ip2p_jax, importlib.util; print(ip2p_jax.__file__);"
                  "print(importlib.util.find_spec('torch'))"], cwd=work)
    assert str(bin_dir.parent) in where.splitlines()[0] and where.splitlines()[1] == "None", where


def test_readme_edit_with_the_demo_model(installed):
    bin_dir, work = installed
    images = sorted(glob.glob(str(work / "examples" / "*.png")))
    out = _run([bin_dir / "ip2p", "edit", "--image", *images, "--instruction", "make the background blue",
                "--out", "edits"], cwd=work)
    assert "demo model" in out
    written = sorted(glob.glob(str(work / "edits" / "*.png")))
    assert len(written) == len(images) and len(glob.glob(str(work / "edits" / "*.json"))) == len(images)
    for path, source in zip(written, images):
        assert Image.open(path).size == Image.open(source).size


def test_tiny_training_resumes_and_exports(installed):
    bin_dir, work = installed
    first = _run([bin_dir / "ip2p", "train", "--config", "configs/train.py:tiny", "--workdir", "run"], cwd=work)
    assert "resumed" not in first
    second = _run([bin_dir / "ip2p", "train", "--config", "configs/train.py:tiny", "--workdir", "run",
                   "--config.train.num_steps=25"], cwd=work)
    assert "resumed from" in second and "step 25/25" in second, second[-2000:]
    _run([bin_dir / "ip2p", "export", "--workdir", "run", "--out", "exported"], cwd=work)
    assert os.path.isfile(work / "exported" / "model_index.json")
    example = sorted(glob.glob(str(work / "examples" / "*.png")))[0]
    edited = _run([bin_dir / "ip2p", "edit", "--model", "exported", "--image", example,
                   "--instruction", "make it red", "--steps", "2", "--out", "tiny_edits"], cwd=work)
    assert glob.glob(str(work / "tiny_edits" / "*.png")), edited
