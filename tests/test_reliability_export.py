"""Model folders we write (ip2p export / convert, save_diffusers_folder, the end-of-training export)
never destroy what they did not create (issue 20, item 1; docs/reliability.md)."""
from __future__ import annotations

import errno
import os

import numpy as np
import pytest

import tiny
from ip2p_jax import cli
from ip2p_jax.errors import Ip2pError
from ip2p_jax.weights import WeightsError, load, save_diffusers_folder
from ip2p_jax.weights.output_folder import MARKER


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    return load(tiny.save_pipeline(str(tmp_path_factory.mktemp("src") / "ip2p"), seed=3))


def user_folder(path) -> dict:
    """A folder of someone's files; returns {name: content} to check it later."""
    os.makedirs(path, exist_ok=True)
    files = {"notes.txt": "precious", "photo.jpg": "not really a jpeg"}
    for name, text in files.items():
        with open(os.path.join(path, name), "w") as f:
            f.write(text)
    return files


def intact(path, files: dict) -> bool:
    return all(open(os.path.join(path, n)).read() == t for n, t in files.items())


def test_export_into_the_current_folder_of_user_files_is_refused(tmp_path, monkeypatch, capsys):
    here = tmp_path / "home"
    files = user_folder(here)
    monkeypatch.chdir(here)
    assert cli.main(["export", "--workdir", str(tmp_path / "run"), "--out", "."]) == 2
    err = capsys.readouterr().err
    assert "current directory" in err and str(here) in err
    assert sorted(os.listdir(here)) == sorted(files) and intact(here, files)
    # a parent of the current folder, and the folder holding the workdir, are refused too
    assert cli.main(["export", "--workdir", str(tmp_path / "run"), "--out", str(tmp_path)]) == 2
    monkeypatch.chdir(tmp_path / "..")
    assert cli.main(["export", "--workdir", str(tmp_path / "run"), "--out", str(tmp_path)]) == 2
    assert "holds" in capsys.readouterr().err and intact(here, files)


def test_non_empty_folder_without_marker_is_refused_even_with_overwrite(components, tmp_path, capsys):
    out = tmp_path / "mine"
    files = user_folder(out)
    for overwrite in (False, True):
        with pytest.raises(WeightsError, match=f"{out}: not empty and not a model folder written by ip2p_jax"):
            save_diffusers_folder(components, str(out), overwrite=overwrite)
    for args in (["export", "--workdir", str(tmp_path / "run"), "--out", str(out), "--overwrite"],
                 ["convert", str(tmp_path / "no-such-model"), str(out), "--overwrite"]):   # checked before loading
        assert cli.main(args) == 2
        assert "not a model folder written by ip2p_jax" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == sorted(files) and intact(out, files)
    assert sorted(os.listdir(tmp_path)) == ["mine"]          # nothing renamed aside or left behind


def test_replacing_an_export_needs_overwrite_and_is_atomic(components, tmp_path, capsys, monkeypatch):
    out = tmp_path / "model"
    save_diffusers_folder(components, str(out))
    assert os.path.isfile(out / MARKER) and os.path.isfile(out / "model_index.json")
    assert cli.main(["export", "--workdir", str(tmp_path / "run"), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(WeightsError, match="already exists"):
        save_diffusers_folder(components, str(out))

    # --overwrite: the new folder is complete before the old one goes; a failure keeps the old one
    (out / "old-only.txt").write_text("from the earlier export")
    import ip2p_jax.weights.diffusers_folder as df

    def no_space(state, path, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(df, "write_safetensors", no_space)
    with pytest.raises(WeightsError, match="No space left on device"):
        save_diffusers_folder(components, str(out), overwrite=True)
    assert (out / "old-only.txt").exists() and sorted(os.listdir(tmp_path)) == ["model"]
    monkeypatch.undo()
    save_diffusers_folder(components, str(out), overwrite=True)
    assert not (out / "old-only.txt").exists() and (out / MARKER).exists()
    assert sorted(os.listdir(tmp_path)) == ["model"]
    # an empty folder is a fine target without --overwrite
    (tmp_path / "empty").mkdir()
    save_diffusers_folder(components, str(tmp_path / "empty"))
    assert (tmp_path / "empty" / MARKER).exists()


def test_non_finite_weights_are_refused(components, tmp_path):
    import dataclasses

    import jax

    unet = jax.tree.map(np.array, components.unet_params)
    leaf = jax.tree.leaves(unet)[0]
    leaf.reshape(-1)[0] = np.nan
    bad = dataclasses.replace(components, unet_params=unet)
    with pytest.raises(WeightsError, match="non-finite weights: 1 tensors hold NaN"):
        save_diffusers_folder(bad, str(tmp_path / "nan"))
    assert not os.listdir(tmp_path)


def test_out_paths_that_cannot_be_written(tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("x")
    run = str(tmp_path / "run")
    for out, why in [(tmp_path / "file", "not a folder"), (tmp_path / "file" / "sub", "is a file, not a folder")]:
        assert cli.main(["export", "--workdir", run, "--out", str(out)]) == 2
        assert why in capsys.readouterr().err
    # a read-only folder (tests may run as root, where chmod does not stop writes: refuse the create)
    ro = tmp_path / "ro"
    ro.mkdir()
    real_open = os.open

    def read_only(path, *a, **k):
        if str(path).startswith(str(ro)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(os, "open", read_only)
    assert cli.main(["export", "--workdir", run, "--out", str(ro / "model")]) == 2
    err = capsys.readouterr().err
    assert "Read-only file system" in err and str(ro) in err and "Traceback" not in err


def test_too_little_free_space_is_found_before_writing(components, tmp_path, monkeypatch):
    import collections

    st = collections.namedtuple("st", "f_bavail f_frsize")
    monkeypatch.setattr(os, "statvfs", lambda p: st(1, 4096))
    with pytest.raises(WeightsError, match=r"model: needs about .* MB, .* has 0.0 MB free"):
        save_diffusers_folder(components, str(tmp_path / "model"))
    assert not os.listdir(tmp_path)


def test_end_of_training_export_into_user_files_is_refused_before_training(tmp_path):
    from train_helpers import tiny_config

    from ip2p_jax.train.loop import train

    out = tmp_path / "mine"
    files = user_folder(out)
    c = tiny_config(str(tmp_path / "no-tokenizer-needed"), export__dir=str(out))
    with pytest.raises(Ip2pError, match="not a model folder written by ip2p_jax"):
        train(c, str(tmp_path / "run"))
    assert intact(out, files) and not os.path.exists(tmp_path / "run" / "checkpoints")
