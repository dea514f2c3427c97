"""Multi-turn sessions (EditPipeline.edit_sequence, ip2p_jax.turns): a session equals chained
edit() calls on the previous 8-bit outputs, several sessions advance together, seeds and the
history are recorded per turn, and bad scripts are clear errors."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

import edit_fixtures as fx
from ip2p_jax import turns as turnlib
from ip2p_jax.pipeline import EditError, EditPipeline

KW = dict(steps=fx.STEPS, resize="keep", batch_size=fx.BATCH)
TURNS = [fx.INSTRUCTION, "add a red circle", "turn the sky blue"]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return EditPipeline.from_pretrained(fx.tiny_model_dir(tmp_path_factory), dtype="fp32")


def test_three_turns_equal_three_chained_edits(pipe):
    img = fx.sample_images(1)[0]
    session = pipe.edit_sequence(img, TURNS, seed=40, **KW)
    assert [r.outputs[0].settings["seed"] for r in session] == [40, 41, 42]
    current = img
    for t, text in enumerate(TURNS):
        single = pipe.edit(current, text, seed=40 + t, progress=False, **KW).outputs[0]
        assert np.array_equal(session[t].arrays[0], single.array), t
        current = single.image            # the 8-bit output, as a user chaining edits would
    # negative control: turn 3 is not turn 2 again, and chaining matters (turn 2 of the input differs)
    assert np.abs(session[2].arrays[0] - session[1].arrays[0]).max() > 1e-2
    direct = pipe.edit(img, TURNS[1], seed=41, progress=False, **KW).outputs[0]
    assert np.abs(direct.array - session[1].arrays[0]).max() > 1e-2
    s = session[2].outputs[0].settings
    assert (s["turn"], s["turns"], s["previous_seed"]) == (3, 3, 41)
    assert s["history"] == [{"instruction": TURNS[0], "seed": 40}, {"instruction": TURNS[1], "seed": 41}]
    assert session[0].outputs[0].settings["previous_seed"] is None
    assert session[0].outputs[0].settings["input_size"] == [fx.W, fx.H]


def test_sessions_of_several_images_advance_together(pipe):
    imgs = fx.sample_images(2)
    turns = [fx.INSTRUCTION, {"instruction": "add a red circle", "seed": 90, "text_scale": 5.0}]
    both = pipe.edit_sequence(imgs, turns, seed=10, **KW)
    assert [[o.settings["seed"] for o in r.outputs] for r in both] == [[10, 12], [90, 91]]
    assert [o.settings["text_scale"] for o in both[1].outputs] == [5.0, 5.0]
    assert both[1].outputs[1].settings["history"] == [{"instruction": fx.INSTRUCTION, "seed": 12}]
    alone = pipe.edit_sequence(imgs[1], turns, seed=[12], **KW)      # session 1 alone
    assert alone[1].outputs[0].settings["seed"] == 90                   # its own seed rule: 90 + 0
    again = pipe.edit_sequence(imgs[1], [fx.INSTRUCTION, {**turns[1], "seed": 91}], seed=[12], **KW)
    for t in range(2):
        assert np.abs(both[t].arrays[1] - again[t].arrays[0]).max() < 1e-5   # batched = alone


@pytest.mark.parametrize("turns, message", [
    ([], "a session has 1 to 64 turns"),
    ("make it winter", "expected a list of turns"),
    ([{"instruction": "x", "colour": 1}], r"turn 1: unknown setting\(s\) \['colour'\]"),
    ([{"seed": 1}], 'turn 1: missing or non-string "instruction"'),
    (["x", {"instruction": "y", "seed": -3}], r"turn 2: seed must be an integer in \[0, 2\*\*32\)"),
])
def test_bad_turns_are_clear_errors(turns, message):
    with pytest.raises(turnlib.TurnError, match=message):
        turnlib.normalize(turns)


def test_session_refuses_several_samples(pipe):
    with pytest.raises(EditError, match="num_samples must be 1"):
        pipe.edit_sequence(fx.sample_images(1)[0], ["x"], num_samples=2, **KW)


def test_script_file(tmp_path):
    script = tmp_path / "s.json"
    script.write_text(json.dumps(["a", {"instruction": "b", "mask": "m.png", "text_scale": 9}]))
    turns = turnlib.read_script(str(script))
    assert turns[1]["mask"] == str(tmp_path / "m.png") and turns[1]["text_scale"] == 9
    script.write_text("{not json")
    with pytest.raises(turnlib.TurnError, match=r"s.json: not a JSON script"):
        turnlib.read_script(str(script))
    with pytest.raises(turnlib.TurnError, match=r"missing.json: cannot read the script"):
        turnlib.read_script(str(tmp_path / "missing.json"))


# ---------------------------------------------------------------- ip2p edit --then / --script

def _cli(model_dir, images, out, *extra):
    from ip2p_jax import cli

    return cli.main(["edit", "--model", model_dir, "--image", *images, "--out", str(out), "--steps", str(fx.STEPS),
                     "--resize", "keep", "--batch-size", str(fx.BATCH), "--quiet", *extra])


@pytest.fixture
def photos(tmp_path):
    paths = []
    for i, im in enumerate(fx.sample_images(2)):
        paths.append(str(tmp_path / f"p{i}.png"))
        im.save(paths[-1])
    return paths


def test_cli_then_writes_each_turn_with_its_sidecar(pipe, photos, tmp_path, capsys):
    out = tmp_path / "out"
    code = _cli(pipe.source, photos, out, "--seed", "20", "--instruction", TURNS[0], "--then", TURNS[1],
                "--then", TURNS[2])
    assert code == 0, capsys.readouterr().err
    names = sorted(os.listdir(out))
    assert names == sorted(f"p{i}_turn{t}.{ext}" for i in range(2) for t in (1, 2, 3) for ext in ("png", "json"))
    side = json.load(open(out / "p1_turn3.json"))
    assert (side["turn"], side["seed"], side["previous_seed"], side["input"]) == (3, 25, 24, photos[1])
    assert [h["seed"] for h in side["history"]] == [23, 24]
    want = pipe.edit_sequence(photos[1], TURNS, seed=23, **KW)      # input 1: seeds 20 + 1 * 3 + t
    assert np.array_equal(np.asarray(Image.open(out / "p1_turn3.png")), np.asarray(want[2].images[0]))


def test_cli_script_with_per_turn_settings(pipe, photos, tmp_path, capsys):
    script = tmp_path / "session.json"
    script.write_text(json.dumps([TURNS[0], {"instruction": TURNS[1], "seed": 7, "text_scale": 4.0}]))
    out = tmp_path / "out"
    assert _cli(pipe.source, photos[:1], out, "--seed", "3", "--script", str(script)) == 0
    side = json.load(open(out / "p0_turn2.json"))
    assert (side["seed"], side["text_scale"], side["history"][0]["seed"]) == (7, 4.0, 3)


@pytest.mark.parametrize("extra, message", [
    (["--instruction", "a", "--instruction", "b", "--then", "c"], "--then continues one --instruction"),
    (["--instruction", "a", "--then", "b", "--num-samples", "2"], "--num-samples and --randomize-scales do not"),
    (["--script", "s.json", "--instruction", "a"], "--script holds the session's instructions"),
    (["--script", "missing.json"], "missing.json: cannot read the script"),
])
def test_cli_session_usage_errors(photos, tmp_path, capsys, extra, message):
    assert _cli("unused-model", photos[:1], tmp_path / "out", *extra) == 2   # before any model is loaded
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the web UI's session (no browser)

def test_app_session_continues_from_any_turn(pipe, tmp_path):
    from ip2p_jax import app

    limits = app.Limits.for_model(64, fx.STEPS)
    ok = dict(steps=fx.STEPS, resolution=64, randomize_seed=False)
    img = fx.sample_images(1)[0]
    h = [{"image": img, "settings": None, "files": []}]
    h = app.continue_session(pipe, h, 0, TURNS[0], limits, str(tmp_path), seed=40, **ok)
    h = app.continue_session(pipe, h, 1, TURNS[1], limits, str(tmp_path), seed=41, **ok)
    assert [x["settings"]["turn"] for x in h[1:]] == [1, 2] and h[2]["settings"]["previous_seed"] == 40
    side = json.load(open(h[2]["files"][1]))
    assert side["history"] == [{"instruction": TURNS[0], "seed": 40}] and side["turn"] == 2
    branch = app.continue_session(pipe, h, 1, TURNS[2], limits, str(tmp_path), seed=41, **ok)   # from turn 1 again
    assert len(branch) == 3 and branch[2]["settings"]["instruction"] == TURNS[2] and branch[1] is h[1]
    chain = pipe.edit_sequence(img, TURNS[:2], seed=40, steps=fx.STEPS, resolution=64)
    assert np.array_equal(np.asarray(h[2]["image"]), np.asarray(chain[1].images[0]))   # = the chained edits
    assert [c for _, c in app.session_gallery(branch)] == [
        "turn 0: input", f"turn 1: {TURNS[0]} (seed 40)", f"turn 2: {TURNS[2]} (seed 41)"]
    with pytest.raises(app.AppError, match=r"^Continue from turn: choose a turn from 0 to 2, got 5"):
        app.continue_session(pipe, h, 5, "x", limits, str(tmp_path), **ok)
    with pytest.raises(app.AppError, match=r"^Edit instruction: write the next turn's instruction"):
        app.continue_session(pipe, h, 0, " ", limits, str(tmp_path), **ok)


def test_app_mask_upload(pipe, tmp_path):
    from ip2p_jax import app

    Image.new("RGBA", (8, 8)).save(tmp_path / "m.png")
    with pytest.raises(app.AppError, match=r"^Mask: m.png: the mask has an alpha channel"):
        app.load_mask_upload(str(tmp_path / "m.png"), 0)
    assert app.load_mask_upload(None, 3) == (None, 0.0)
    right = np.zeros((fx.H, fx.W), np.uint8)
    right[:, fx.W // 2:] = 255
    Image.fromarray(right).save(tmp_path / "right.png")
    m, blur = app.load_mask_upload(str(tmp_path / "right.png"), 0)
    limits = app.Limits.for_model(64, fx.STEPS)
    img = fx.sample_images(1)[0]
    outs, *_ = app.generate(pipe, img, fx.INSTRUCTION, limits, str(tmp_path), seed=3, randomize_seed=False,
                            steps=fx.STEPS, resolution=64, mask=m, mask_blur=blur)
    want = pipe.edit(img, fx.INSTRUCTION, seed=3, steps=fx.STEPS, resolution=64, mask=m, progress=False)
    assert np.array_equal(np.asarray(outs[0].image), np.asarray(want.images[0]))
    assert outs[0].settings["mask"] == "mask of upload"


def test_app_painted_mask():
    from ip2p_jax import app

    assert app.brush_mask(None) is None and app.brush_mask({"layers": []}) is None
    blank = Image.new("RGBA", (8, 6))
    assert app.brush_mask({"background": blank, "layers": [blank]}) is None      # nothing painted
    strokes = np.zeros((6, 8, 4), np.uint8)
    strokes[:, 4:] = (255, 0, 0, 255)
    strokes[0, 0] = (0, 0, 255, 128)                                               # a soft stroke
    m = app.brush_mask({"background": blank, "layers": [Image.fromarray(strokes, "RGBA")]})
    assert m.mode == "L" and np.asarray(m)[0, 0] == 128 and np.asarray(m)[:, 4:].min() == 255
    assert np.asarray(m)[1:, :4].max() == 0
    got, blur = app.request_mask(None, {"layers": [Image.fromarray(strokes, "RGBA")]}, 2)
    assert np.array_equal(np.asarray(got), np.asarray(m)) and blur == 2.0
    with pytest.raises(app.AppError, match=r"^Mask: upload a mask or paint one, not both"):
        app.request_mask("m.png", {"layers": [Image.fromarray(strokes, "RGBA")]}, 0)
