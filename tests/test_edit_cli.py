"""`ip2p edit` on a folder of real-world inputs (made here), grids, and its exit-status rule:
0 when at least one result was written, 1 when nothing could be edited, 2 for usage errors."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import edit_fixtures as fx
import tiny
from ip2p_jax import cli
from ip2p_jax.commands import edit as edit_cmd


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return fx.tiny_model_dir(tmp_path_factory)


@pytest.fixture
def inputs(tmp_path):
    """Mixed inputs that all come out 48x32 (the shape the other edit tests compile for)."""
    d = tmp_path / "in"
    d.mkdir()
    rgb = tiny.random_image(fx.H, fx.W, seed=1)
    rgba = np.concatenate([rgb, np.full((fx.H, fx.W, 1), 128, np.uint8)], -1)
    Image.fromarray(rgba, "RGBA").save(d / "a_rgba.png")
    Image.fromarray(rgb[..., 0], "L").save(d / "b_gray.png")
    Image.fromarray(rgb[..., 1].astype(np.uint16) * 257).save(d / "c_16bit.png")
    with open(d / "d_broken.png", "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    exif = Image.Exif()
    exif[0x0112] = 6   # stored 32 wide x 48 high, displayed rotated to 48 x 32
    Image.fromarray(np.ascontiguousarray(np.rot90(rgb, 1))).save(d / "e_rotated.jpg", exif=exif.tobytes())
    return d


def _args(model_dir, images, out, *extra):
    return ["edit", "--model", model_dir, "--image", *images, "--instruction", fx.INSTRUCTION, "--out", str(out),
            "--steps", str(fx.STEPS), "--resize", "keep", "--batch-size", str(fx.BATCH), "--quiet", *extra]


def test_folder_of_mixed_inputs(model_dir, inputs, tmp_path, capsys, monkeypatch):
    from ip2p_jax import sharding

    caches = []   # the real switch changes process-wide JAX settings; the test only checks the wiring
    monkeypatch.setattr(sharding, "enable_compilation_cache", lambda d=None: caches.append(d))
    out = tmp_path / "out"
    code = cli.main(_args(model_dir, [str(inputs)], out, "--seed", "11", "--compilation-cache", str(tmp_path / "c")))
    err = capsys.readouterr().err
    assert code == 0, err
    assert caches == [str(tmp_path / "c")]
    assert "d_broken.png" in err and "skipping" in err and "1 of 5 input(s) skipped" in err
    pngs = sorted(p for p in os.listdir(out) if p.endswith(".png"))
    assert len(pngs) == 4 and not any("broken" in p for p in pngs)
    assert not any(p.endswith(".part") for p in os.listdir(out))
    sidecars = [json.load(open(out / (p[:-4] + ".json"))) for p in pngs]
    assert [s["seed"] for s in sidecars] == [11, 12, 13, 14]       # readable inputs, in name order
    for p, s in zip(pngs, sidecars):
        assert Image.open(out / p).size == (fx.W, fx.H)
        assert s["instruction"] == fx.INSTRUCTION and s["steps"] == fx.STEPS and s["model"] == model_dir
        assert os.path.basename(s["input"]) in {"a_rgba.png", "b_gray.png", "c_16bit.png", "e_rotated.jpg"}
    assert sidecars[3]["input_size"] == [fx.W, fx.H]   # EXIF rotation applied

    # the sidecar's seed reproduces a result on its own, without overwriting anything
    rotated = sidecars[3]
    code = cli.main(_args(model_dir, [rotated["input"]], out, "--seed", str(rotated["seed"])))
    assert code == 0
    again = [p for p in os.listdir(out) if p.startswith(pngs[3][:-4]) and p != pngs[3] and p.endswith(".png")]
    assert len(again) == 1
    np.testing.assert_array_equal(np.asarray(Image.open(out / again[0])), np.asarray(Image.open(out / pngs[3])))


def test_grid(model_dir, inputs, tmp_path):
    out = tmp_path / "grid"
    code = cli.main(_args(model_dir, [str(inputs / "a_rgba.png")], out, "--seed", "5", "--grid",
                          "--text-scales", "3,7.5", "--image-scales", "1.2,1.5"))
    assert code == 0
    (png,) = [p for p in os.listdir(out) if p.endswith(".png")]
    grid = Image.open(out / png)
    assert grid.width > 2 * fx.W and grid.height > 2 * fx.H
    side = json.load(open(out / (png[:-4] + ".json")))
    assert side["grid"] == {"rows_image_scale": [1.2, 1.5], "columns_text_scale": [3.0, 7.5]}
    assert side["seed"] == 5


def test_nothing_readable_exits_1(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    Image.new("RGB", (2100, 2100), "gray").save(tmp_path / "huge.png")   # too big to edit at full size
    code = cli.main(["edit", "--model", model_dir, "--image", str(bad), str(tmp_path / "missing.png"),
                     str(tmp_path / "huge.png"), "--resize", "keep", "--instruction", "x", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1
    assert "bad.jpg: not a readable image" in err and "missing.png: no such file" in err
    assert "huge.png: 2096x2096 is too large to edit at full size" in err
    assert "none of the 3 input(s) can be edited" in err


def test_no_model_is_a_usage_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(edit_cmd, "find_demo_model", lambda: None)
    code = cli.main(["edit", "--image", "x.png", "--instruction", "x", "--out", str(tmp_path)])
    assert code == 2
    assert "no --model given and no demo model installed" in capsys.readouterr().err


EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "shapes_0.png")


def test_demo_model_defaults_fit_the_model(tmp_path, capsys):
    """The README's example as written: no --model, the default resize rule. The demo model edits at
    its native 64 px and 20 steps (not 512 px / 100 steps), and says which model it uses and why."""
    out = tmp_path / "edits"
    code = cli.main(["edit", "--image", EXAMPLE, "--instruction", "make the background blue", "--out", str(out),
                     "--seed", "0", "--quiet"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "the demo model" in err and "no --model given" in err and "resolution 64" in err
    pngs = [p for p in os.listdir(out) if p.endswith(".png")]
    assert len(pngs) == 1 and Image.open(out / pngs[0]).size == (64, 64)
    side = json.load(open(out / (pngs[0][:-4] + ".json")))
    assert (side["steps"], side["resolution"]) == (20, 64)


def test_edit_budget_is_checked_before_compiling_and_names_the_flag(tmp_path, capsys):
    out = tmp_path / "edits"
    code = cli.main(["edit", "--image", EXAMPLE, "--instruction", "x", "--out", str(out), "--resolution", "4096",
                     "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "4096x4096" in err and "--max-edit-pixels" in err and "4.2 MP" in err
    assert not out.exists()


def test_a_failed_run_leaves_no_empty_output_folder(tmp_path, monkeypatch):
    from ip2p_jax.pipeline import EditPipeline

    def broken(self, *a, **k):
        raise RuntimeError("device lost")
        yield

    monkeypatch.setattr(EditPipeline, "iter_edit", broken)
    out = tmp_path / "edits"
    with pytest.raises(RuntimeError, match="device lost"):
        cli.main(["edit", "--image", EXAMPLE, "--instruction", "x", "--out", str(out), "--quiet"])
    assert not out.exists()
    existing = tmp_path / "mine"
    existing.mkdir()
    with pytest.raises(RuntimeError):
        cli.main(["edit", "--image", EXAMPLE, "--instruction", "x", "--out", str(existing), "--quiet"])
    assert existing.is_dir()   # a folder the user made stays


@pytest.mark.parametrize("flags, message", [
    (["--steps", "1000000000"], "steps / --steps must be an integer from 1 to 1000"),
    (["--text-scale", "nan"], "text_scale / --text-scale must be finite"),
    (["--image-scale", "inf"], "image_scale / --image-scale must be finite"),
    (["--num-samples", "100000"], "num_samples / --num-samples must be an integer from 1 to 256"),
    (["--grid", "--text-scales", "1,nan"], "text_scale / --text-scale must be finite"),
])
def test_unbounded_requests_are_refused_at_once(flags, message, tmp_path, capsys):
    import time

    out = tmp_path / "edits"
    start = time.perf_counter()
    code = cli.main(["edit", "--image", EXAMPLE, "--instruction", "x", "--out", str(out), "--quiet", *flags])
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert elapsed < 1.0 and not out.exists()   # refused before any model is loaded or plan is built


def test_request_limits_hold_for_the_api(tmp_path_factory):
    from ip2p_jax.pipeline import EditError, EditPipeline

    pipe = EditPipeline.from_pretrained(fx.tiny_model_dir(tmp_path_factory), dtype="fp32")
    for kwargs, message in ((dict(steps=10 ** 9), "steps"), (dict(text_scale=float("nan")), "text_scale"),
                            (dict(image_scale=[1.5, float("inf")]), "image_scale"),
                            (dict(batch_size=10 ** 6), "batch_size")):
        with pytest.raises(EditError, match=message):
            pipe.edit(fx.sample_images(2), fx.INSTRUCTION, progress=False, **kwargs)


def test_outputs_never_write_through_planted_names(tmp_path, capsys):
    """Symlinks planted at the predictable temporary name and at the output name itself are never
    written through: the victim file stays as it was and the result gets a name of its own."""
    out = tmp_path / "edits"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    stem = "shapes_0_make-it-blue_0"
    os.symlink(victim, out / f"{stem}.png.part")
    os.symlink(victim, out / f"{stem}.png")
    code = cli.main(["edit", "--image", EXAMPLE, "--instruction", "make it blue", "--out", str(out), "--seed", "0",
                     "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert victim.read_text() == "precious"
    assert Image.open(out / f"{stem}-1.png").size == (64, 64)
    assert json.load(open(out / f"{stem}-1.json"))["seed"] == 0
    assert not [p for p in os.listdir(out) if p.endswith(".part") and not os.path.islink(out / p)]


def test_concurrent_writers_never_share_a_name(tmp_path):
    import threading

    image = Image.fromarray(tiny.random_image(8, 8))
    paths, barrier = [], threading.Barrier(8)

    def writer(i):
        barrier.wait()
        paths.append(edit_cmd.write_result(str(tmp_path), "same", image, {"writer": i}))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(paths)) == 8
    assert sorted(json.load(open(p[:-4] + ".json"))["writer"] for p in paths) == list(range(8))
