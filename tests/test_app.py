"""The web UI's logic without a browser: request limits (errors name the UI field, before any
compile), uploads, Generate's PNG + sidecar, the guidance sweep (equal to single edits), the
bounded compile cache, and the missing-gradio message. The browser test is test_app_browser.py."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

import edit_fixtures as fx
from ip2p_jax import app, cli, placement
from ip2p_jax.commands import app as app_cmd
from ip2p_jax.commands import edit as edit_cmd
from ip2p_jax.pipeline import EditPipeline

LIMITS = app.Limits.for_model(64, fx.STEPS, max_sweep_cells=4)
OK = dict(steps=fx.STEPS, resolution=64)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return EditPipeline.from_pretrained(fx.tiny_model_dir(tmp_path_factory), dtype="fp32")


def test_app_without_gradio_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)   # import gradio -> ImportError, installed or not
    assert cli.main(["app", "--model", "unused"]) == 2
    assert "pip install 'ip2p_jax[app]'" in capsys.readouterr().err


def test_menus_follow_the_model():
    demo = app.Limits.for_model(64, 20)
    assert demo.steps == (10, 20, 50, 100) and demo.resolutions == (64, 128)
    sd = app.Limits.for_model(512, 100, max_edit_pixels=768 * 768)
    assert sd.resolutions == (64, 128, 256, 384, 512, 640, 768)
    assert app.Limits.for_model(64, 3).steps == (3, 10, 20, 50, 100)
    with pytest.raises(app.AppError, match="--max-samples must be from 1 to 256"):
        app.Limits.for_model(64, 20, max_samples=1000)


@pytest.mark.parametrize("change, field", [
    (dict(steps=7), "Steps: choose one of 3, 10, 20, 50, 100, got 7"),
    (dict(steps=10 ** 9), "Steps: choose one of"),
    (dict(steps="many"), "Steps: expected a whole number"),
    (dict(resolution=4096), "Resolution: choose one of 64, 128, got 4096"),
    (dict(num_samples=5), "Samples: must be from 1 to 4, got 5"),
    (dict(text_scale=float("nan")), "Text CFG: must be finite"),
    (dict(image_scale="abc"), "Image CFG: must be a finite number"),
    (dict(image_scale=1e9), "Image CFG: must be finite numbers with |value| <= 100"),
    (dict(seed=-1), "Seed: must be from 0"),
    (dict(sampler="plms"), "Sampler: choose one of"),
])
def test_out_of_bounds_requests_name_the_field_before_any_compile(change, field):
    with pytest.raises(app.AppError) as e:   # pipe=None: refused before the model is touched
        app.generate(None, Image.new("RGB", (8, 8)), "x", LIMITS, "unused", randomize_seed=False,
                     seed=change.pop("seed", 1), **{**OK, **change})
    assert str(e.value).startswith(field), str(e.value)


def test_sweep_limits_name_the_field():
    img = Image.new("RGB", (8, 8))
    with pytest.raises(app.AppError, match=r"^Text scales x Image scales: 3x2 = 6 cells, more than the limit of 4"):
        app.sweep(None, img, "x", LIMITS, "unused", text_scales="1 2 3", image_scales="1, 2", **OK)
    with pytest.raises(app.AppError, match=r"^Image scales: must be a finite number, got 'x'"):
        app.sweep(None, img, "x", LIMITS, "unused", text_scales="1", image_scales="1, x", **OK)
    with pytest.raises(app.AppError, match=r"^Text scales: give at least one number"):
        app.sweep(None, img, "x", LIMITS, "unused", text_scales=" ", image_scales="1", **OK)
    assert app.parse_scales("3, 5 7.5", "f") == [3.0, 5.0, 7.5]


def test_bad_uploads_are_clear_errors(tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("this is not a picture")
    with pytest.raises(app.AppError, match=r"^Input image: notes.png: not a readable image"):
        app.load_upload(str(fake), LIMITS)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(app.AppError, match=r"^Input image: empty.png is empty"):
        app.load_upload(str(tmp_path / "empty.png"), LIMITS)
    with pytest.raises(app.AppError, match=r"^Input image: upload an image first"):
        app.load_upload(None, LIMITS)
    big = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(big)
    with pytest.raises(app.AppError, match=r"^Input image: big.png: 100x100 = .* over the limit"):
        app.load_upload(str(big), app.Limits.for_model(64, 20, max_pixels=5000))


def test_generate_returns_png_and_the_edit_sidecar(pipe, tmp_path):
    img = fx.sample_images(1)[0]
    outs, paths, seed, ts, i_s = app.generate(pipe, img, fx.INSTRUCTION, LIMITS, str(tmp_path), seed=11,
                                              randomize_seed=False, name="cat.png", num_samples=2,
                                              text_scale=6.0, image_scale=1.25, **OK)
    assert (seed, ts, i_s) == (11, 6.0, 1.25) and len(outs) == 2 and len(paths) == 4
    for k, out in enumerate(outs):
        png, side = paths[2 * k], paths[2 * k + 1]
        assert side == png[:-4] + ".json"
        with open(side) as f:
            meta = json.load(f)
        assert meta == edit_cmd.sidecar("cat.png", pipe.source, out.settings)   # the sidecar ip2p edit writes
        assert meta["seed"] == 11 + k and meta["steps"] == fx.STEPS and meta["input"] == "cat.png"
        assert np.array_equal(np.asarray(Image.open(png)), np.asarray(out.image))
    again = app.generate(pipe, img, fx.INSTRUCTION, LIMITS, str(tmp_path), seed=11, randomize_seed=False,
                         num_samples=2, text_scale=6.0, image_scale=1.25, **OK)[0][0]   # same shape: no compile
    assert np.array_equal(np.asarray(again.image), np.asarray(outs[0].image))   # the reported seed reproduces


def test_randomized_seed_and_scales_are_reported(pipe, tmp_path):
    """The authors' randomise controls: the seed and scales used come back (to fill in the fields),
    within the authors' ranges, and a reported seed given back is kept."""
    img = fx.sample_images(1)[0]
    _, _, seed, ts, i_s = app.generate(pipe, img, "", LIMITS, str(tmp_path), randomize_seed=True,
                                       randomize_scales=True, **OK)
    assert 0 <= seed < 2 ** 31 and 6 <= ts <= 9 and 1.2 <= i_s <= 1.8
    _, _, seed2, ts2, _ = app.generate(pipe, img, "", LIMITS, str(tmp_path), seed=seed, randomize_seed=False,
                                       text_scale=5.0, **OK)
    assert (seed2, ts2) == (seed, 5.0)


def test_sweep_equals_individual_edits(pipe, tmp_path):
    img = fx.sample_images(1)[0]
    grid, paths, seed, cells = app.sweep(pipe, img, fx.INSTRUCTION, LIMITS, str(tmp_path), text_scales="2, 7.5",
                                         image_scales="1, 1.5", seed=5, randomize_seed=False, name="in.png", **OK)
    scales = [(t, i) for i in (1.0, 1.5) for t in (2.0, 7.5)]     # rows image scale, columns text scale
    assert [(c.settings["text_scale"], c.settings["image_scale"]) for c in cells] == scales
    for cell, (t, i) in zip(cells, scales):
        single = pipe.edit(img, fx.INSTRUCTION, text_scale=t, image_scale=i, seed=5, resolution=64,
                           steps=fx.STEPS, progress=False).outputs[0]        # alone in its call
        assert np.abs(cell.array - single.array).max() < 1e-5
    # negative control: the scales matter, so equal cells above are not vacuous
    assert np.abs(cells[0].array - cells[3].array).max() > 1e-2
    with open(paths[1]) as f:
        meta = json.load(f)
    assert meta["grid"] == {"rows_image_scale": [1.0, 1.5], "columns_text_scale": [2.0, 7.5]}
    assert meta["seed"] == 5 and meta["model"] == pipe.source and "text_scale" not in meta
    assert Image.open(paths[0]).size == grid.size and grid.width > 2 * cells[0].image.width


def test_compile_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(placement, "MAX_COMPILED", 2)
    monkeypatch.setattr(placement, "_COMPILED", type(placement._COMPILED)())
    built = []

    def build(*key):
        built.append(key)
        return object()

    a = placement.compiled(build, 1)
    placement.compiled(build, 2)
    assert placement.compiled(build, 1) is a         # a hit refreshes 1
    placement.compiled(build, 3)                     # evicts 2, the least recently used
    assert len(placement._COMPILED) == 2 and placement.compiled(build, 1) is a
    placement.compiled(build, 2)
    assert built == [(1,), (2,), (3,), (2,)]


def test_only_loopback_is_quiet():
    assert app_cmd._is_loopback("127.0.0.1") and app_cmd._is_loopback("localhost") and app_cmd._is_loopback("::1")
    assert not app_cmd._is_loopback("0.0.0.0") and not app_cmd._is_loopback("example.org")


def test_steps_flag_is_bounded(monkeypatch, capsys, tmp_path):
    pytest.importorskip("gradio")
    code = cli.main(["app", "--model", str(tmp_path), "--steps", str(10 ** 9)])
    assert code == 2 and "--steps must be from 1 to 1000" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_the_ui_queue_is_bounded(tmp_path):
    pytest.importorskip("gradio")

    class FakePipe:
        native_resolution = 64
        default_sampler = "euler_a"
        default_text_scale = 7.5

    limits = app.Limits.for_model(64, 20, queue_size=3, concurrency=2)
    ui = app.build_ui(FakePipe(), limits, steps_default=20, out_root=str(tmp_path))
    assert ui._queue.max_size == 3 and ui._queue.default_concurrency_limit == 2


def test_app_command_says_which_model_and_warns_when_public(monkeypatch, capsys):
    pytest.importorskip("gradio")

    class FakePipe:
        native_resolution = 64

    seen = {}
    monkeypatch.setattr(app_cmd.EditPipeline, "from_pretrained", classmethod(lambda cls, m, dtype=None: FakePipe()))
    monkeypatch.setattr(app, "build_ui", lambda pipe, limits, **kw: seen.update(limits=limits, **kw) or "ui")
    monkeypatch.setattr(app, "launch", lambda ui, limits, **kw: seen.update(launch=kw))
    assert cli.main(["app", "--host", "0.0.0.0", "--share", "--port", "7999", "--queue-size", "5"]) == 0
    captured = capsys.readouterr()
    assert "ip2p app: using" in captured.out and "no --model given: the demo model" in captured.out
    assert "default 20 steps, resolution 64" in captured.out
    assert "serving on 0.0.0.0: anyone who can reach this address" in captured.err
    assert "--share: the UI becomes public" in captured.err
    assert seen["launch"] == dict(host="0.0.0.0", port=7999, share=True)
    assert seen["steps_default"] == 20 and seen["limits"].queue_size == 5
    assert cli.main(["app"]) == 0 and "serving on" not in capsys.readouterr().err   # loopback: quiet
