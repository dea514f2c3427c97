"""ip2p_jax.files: the one writer. Complete files or nothing, exclusive claims, ordinary modes."""
from __future__ import annotations

import os
import stat

import pytest

from ip2p_jax import files


def test_written_files_get_the_mode_plain_open_gives(tmp_path):
    files.write_text(str(tmp_path / "a.txt"), "x")
    with open(tmp_path / "b.txt", "w") as f:
        f.write("x")
    mode = stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "b.txt").st_mode) and mode & 0o044   # not mkstemp's 0600


def test_exclusive_never_replaces_and_a_failed_write_leaves_nothing(tmp_path):
    target = str(tmp_path / "out.json")
    files.write_json(target, {"a": 1}, exclusive=True)
    with pytest.raises(FileExistsError):
        files.write_json(target, {"a": 2}, exclusive=True)
    with pytest.raises(ValueError):
        files.write_json(target, {"a": float("nan")})
    assert open(target).read().strip() == '{\n  "a": 1\n}' and os.listdir(tmp_path) == ["out.json"]
