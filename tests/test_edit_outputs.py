"""`ip2p edit --out` at the edges: a file, under a file, read-only, a full disk. Each is one line
naming the path (exit 2); the unwritable cases are refused before the model loads, and a disk that
fills mid-run keeps the results already written complete."""
from __future__ import annotations

import errno
import os
import time

import pytest

from ip2p_jax import cli, files
from ip2p_jax.pipeline import EditPipeline

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
EXAMPLE = os.path.join(EXAMPLES, "shapes_0.png")


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the output folder was checked")
    monkeypatch.setattr(EditPipeline, "from_pretrained", refuse)


def _edit(out, *extra):
    return cli.main(["edit", "--image", EXAMPLE, "--instruction", "x", "--out", str(out), "--quiet", *extra])


def test_out_is_a_file_or_under_one(tmp_path, capsys, no_model_load):
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    for out, message in [(afile, "exists and is not a folder"), (afile / "sub", "is a file, not a folder")]:
        t0 = time.perf_counter()
        assert _edit(out) == 2
        err = capsys.readouterr().err
        assert message in err and str(out) in err and "Traceback" not in err and time.perf_counter() - t0 < 1
    assert afile.read_text() == "mine"


def test_read_only_out_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch, no_model_load):
    def read_only(*a, **k):   # tests may run as root, where chmod does not stop writes
        raise PermissionError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(files.tempfile, "mkstemp", read_only)
    assert _edit(tmp_path / "edits") == 2
    err = capsys.readouterr().err
    assert "cannot write in" in err and "Read-only file system" in err and not (tmp_path / "edits").exists()


def test_a_disk_that_fills_keeps_the_results_already_written(tmp_path, capsys, monkeypatch):
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) > 2:    # the first result (PNG + sidecar) fits, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)
    monkeypatch.setattr(files.os, "fsync", fsync)
    out = tmp_path / "edits"
    code = cli.main(["edit", "--image", EXAMPLE, os.path.join(EXAMPLES, "shapes_1.png"), "--instruction", "x",
                     "--out", str(out), "--steps", "2", "--seed", "0", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err and "are complete" in err and "Traceback" not in err
    names = sorted(os.listdir(out))
    assert names == ["shapes_0_x_0.json", "shapes_0_x_0.png"], names   # no .part file, no half result
