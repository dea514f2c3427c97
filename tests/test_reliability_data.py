"""Dataset builds leave nothing behind and never lose a dataset; the splits a run needs are checked before
step 1; --data-dir errors are one line (issue 20, items 2, 5, 6; docs/reliability.md)."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time

import pytest

from data_helpers import write_jsonl
from train_helpers import tiny_config, tokenizer_dir

from ip2p_jax.data import builder as B
from ip2p_jax.data.leftovers import OWNER


def build(tmp_path, data_dir, **kw):
    src = tmp_path / "src"
    if not (src / "pairs.jsonl").exists():
        write_jsonl(str(src), n=8, size=16)
    return B.build_dataset("jsonl", str(src / "pairs.jsonl"), str(data_dir), "mine", progress=False, **kw)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_killed_build_leftovers_are_removed_and_reported(tmp_path, caplog):
    import socket

    data = tmp_path / "data"
    killed = data / ".build-mine-abc123"          # what a SIGKILLed build leaves (dataset-sized in real life)
    (killed / "edit_pairs").mkdir(parents=True)
    (killed / "edit_pairs" / "shard.array_record").write_bytes(b"x" * 100_000)
    (killed / OWNER).write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname()}))
    old_style = data / ".build-other-xyz"         # from a build without owner.json, long ago
    old_style.mkdir()
    past = time.time() - 3600
    os.utime(old_style, (past, past))
    live = data / ".build-mine-live"              # a build running now (this process) is left alone
    live.mkdir()
    (live / OWNER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    with caplog.at_level("WARNING", logger="ip2p_jax.data.builder"):
        build(tmp_path, data)
    assert not killed.exists() and not old_style.exists() and live.exists()
    assert f"removed {killed}, left by an interrupted dataset build (0.1 MB)" in caplog.text
    assert sorted(n for n in os.listdir(data) if n.startswith(".")) == [".build-mine-live"]


def test_interrupted_overwrite_is_recovered_on_the_next_open(tmp_path, caplog):
    data = tmp_path / "data"
    build(tmp_path, data)
    final = B.dataset_dir(str(data), "mine")
    n = B.open_dataset(str(data), "mine").info.splits["train"].num_examples
    # killed between the two renames of --overwrite: the dataset is only in .old-*
    stranded = data / ".old-mine-k1ll3d"
    stranded.mkdir()
    os.replace(final, stranded / B.VERSION)
    with caplog.at_level("WARNING", logger="ip2p_jax.data.builder"):
        ds = B.open_dataset(final)                 # a version folder works as well as (data_dir, name)
    assert ds.info.splits["train"].num_examples == n and not stranded.exists()
    assert "moved it back" in caplog.text and str(stranded) in caplog.text
    # and on the next build, which then refuses to replace it without --overwrite
    os.replace(final, (stranded.mkdir() or stranded) / B.VERSION)
    with pytest.raises(B.BuildError, match="already exists"):
        build(tmp_path, data)
    assert os.path.isdir(final) and not stranded.exists()


def test_data_dir_errors_are_one_line(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(B.BuildError, match="--data-dir .*file: exists and is not a folder"):
        build(tmp_path, tmp_path / "file")
    with pytest.raises(B.BuildError, match="--data-dir .*cannot create the folder"):
        build(tmp_path, tmp_path / "file" / "data")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "data"))

    monkeypatch.setattr(B.json, "dump", full)          # the disk fills up while the build finishes
    with pytest.raises(B.BuildError, match="No space left on device"):
        build(tmp_path, tmp_path / "data")
    assert not [n for n in os.listdir(tmp_path / "data") if n.startswith(".build-")]


def test_missing_validation_split_is_an_error_before_step_one(tmp_path):
    from ip2p_jax.train.loop import train

    data = tmp_path / "data"
    report = build(tmp_path, data)
    assert "train" in report.examples
    c = tiny_config(tokenizer_dir(str(tmp_path)), data__source="tfds", data__path=str(data), data__name="mine",
                    data__validation_split="nope", log__sample_every_steps=1000, train__num_steps=2000)
    c.log.tensorboard = False
    with pytest.raises(B.Ip2pError, match=r"--config.data.validation_split='nope': the dataset .* has no such "
                                          r"split \(it has .*train"):
        train(c, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "1")
