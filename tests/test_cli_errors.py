"""The CLI's error rule: the project's own errors (Ip2pError: bad input or settings) are one line on
stderr and exit status 2; anything else is a bug and propagates with its traceback. And its logging:
INFO by default, DEBUG with -v, WARNING with -q; library code installs no handler."""
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ip2p_jax import cli
from ip2p_jax.commands import convert as convert_cmd
from ip2p_jax.commands import edit as edit_cmd
from ip2p_jax.weights import WeightsError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "in.png"
    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(path)
    return str(path)


def _edit(image, out, *extra):
    return ["edit", "--image", image, "--instruction", "x", "--out", str(out), *extra]


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"ip2p {command}: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_missing_model_folder_exits_2_with_one_line(image, tmp_path, capsys):
    missing = str(tmp_path / "no_such_model")
    assert cli.main(_edit(image, tmp_path / "out", "--model", missing)) == 2
    assert f"{missing}: no such file or folder" in _one_line_error(capsys, "edit")


@pytest.mark.parametrize("extra, says", [
    (["--steps", "0"], "--steps, --num-samples and --batch-size must be positive"),
    (["--sampler", "nope"], "nope"),
    (["--grid", "--text-scales", ""], "--grid needs at least one --text-scales"),
])
def test_bad_options_exit_2_with_one_line(extra, says, image, tmp_path, capsys):
    assert cli.main(_edit(image, tmp_path / "out", "--model", str(tmp_path), *extra)) == 2
    assert says in _one_line_error(capsys, "edit")


def test_unreadable_weights_exit_2_with_one_line(tmp_path, capsys):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"not a safetensors file")
    assert cli.main(["convert", str(bad), str(tmp_path / "out")]) == 2
    assert f"{bad}: not a readable safetensors file" in _one_line_error(capsys, "convert")


@pytest.mark.parametrize("bug", [ValueError("a genuine numpy bug"), ZeroDivisionError("division by zero"),
                                 FileNotFoundError(2, "No such file or directory", "/internal/cache")])
def test_a_bug_keeps_its_traceback(bug, monkeypatch, image, tmp_path, capsys):
    def broken(*args, **kwargs):
        raise bug

    monkeypatch.setattr(edit_cmd, "check_names", broken)
    with pytest.raises(type(bug)) as e:
        cli.main(_edit(image, tmp_path / "out", "--model", str(tmp_path)))
    assert e.value is bug and "error:" not in capsys.readouterr().err


def test_a_bug_prints_a_traceback_and_exits_1(tmp_path):
    """End to end: the console script lets Python report the bug (traceback, exit status 1)."""
    code = ("import sys; from ip2p_jax import cli; from ip2p_jax.commands import convert\n"
            "def load(*a, **k): raise ValueError('shapes do not broadcast (a bug)')\n"
            "convert.load = load\n"
            f"sys.exit(cli.main(['convert', {str(tmp_path)!r}, {str(tmp_path / 'out')!r}]))\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback (most recent call last)" in proc.stderr
    assert "ValueError: shapes do not broadcast (a bug)" in proc.stderr and "ip2p convert: error" not in proc.stderr


@pytest.mark.parametrize("flags, shown, hidden", [
    ([], ["progress line"], ["debug detail"]),
    (["-v"], ["progress line", "DEBUG ip2p_jax.weights.loader: debug detail"], []),
    (["-q"], ["a warning"], ["progress line", "debug detail"]),
])
def test_verbosity_flags(flags, shown, hidden, monkeypatch, tmp_path, capsys):
    def load(*args, **kwargs):
        log = logging.getLogger("ip2p_jax.weights.loader")
        log.debug("debug detail")
        log.info("progress line")
        log.warning("a warning")
        raise WeightsError("stop here")

    monkeypatch.setattr(convert_cmd, "load", load)
    assert cli.main([*flags, "convert", str(tmp_path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert all(s in err for s in shown) and not any(h in err for h in hidden), err
    assert err.count("a warning") == 1   # one handler, however often main() runs


def test_library_installs_no_logging_handler():
    code = ("import logging, ip2p_jax.cli, ip2p_jax.pipeline, ip2p_jax.weights, ip2p_jax.data.pipeline\n"
            "assert not logging.getLogger().handlers, logging.getLogger().handlers\n"
            "assert not logging.getLogger('ip2p_jax').handlers\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr
