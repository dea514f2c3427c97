"""MagicBrush's metrics (ip2p_jax.metrics.magicbrush): L1/L2 against numpy by hand, CLIP-I/CLIP-T
against transformers on a tiny random CLIPModel, and scripts/evaluate_magicbrush.py end to end on
a synthetic MagicBrush-layout dataset."""
import importlib.util
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

import tiny
from ip2p_jax.metrics import clip_scores as cs
from ip2p_jax.metrics import magicbrush as mb
from test_data_magicbrush import rows, write
from test_metrics_clip import _reference, save_tiny_clip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(str(tmp_path_factory.mktemp("clip")))


@pytest.fixture(scope="module")
def scorer(clip_dir):
    return cs.ClipScorer.from_pretrained(clip_dir, batch_size=4)


def test_pixel_distances_by_hand():
    black, white = np.zeros((4, 6, 3), np.uint8), np.full((4, 6, 3), 255, np.uint8)
    assert mb.pixel_distances(white, black) == (1.0, 1.0)
    a, b = tiny.random_image(20, 30, seed=1), tiny.random_image(20, 30, seed=2)
    d = a.astype(np.float64) / 255 - b.astype(np.float64) / 255
    l1, l2 = mb.pixel_distances(Image.fromarray(a), b)
    assert l1 == pytest.approx(np.abs(d).mean(), abs=1e-12) and l2 == pytest.approx((d ** 2).mean(), abs=1e-12)
    # another size: the edit is resized (PIL bicubic) to the target's size first
    small = tiny.random_image(10, 16, seed=3)
    resized = np.asarray(Image.fromarray(small).resize((30, 20), resample=Image.BICUBIC)).astype(np.float64) / 255
    d = resized - b.astype(np.float64) / 255
    l1, l2 = mb.pixel_distances(small, b)
    assert l1 == pytest.approx(np.abs(d).mean(), abs=1e-12) and l2 == pytest.approx((d ** 2).mean(), abs=1e-12)


def test_clip_i_and_clip_t_equal_transformers(clip_dir, scorer):
    sizes = [(40, 57), (33, 45), (32, 32)]
    edited = [tiny.random_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    targets = [tiny.random_image(h, w, seed=10 + i) for i, (h, w) in enumerate(sizes)]
    texts = ["a red circle", "the winter sky", "a cat"]
    ref, _ = _reference(clip_dir, targets, edited, texts, texts)   # sim_image = cos(target, edit); sim_1 = cos(edit, text)
    got = mb.turn_scores(scorer, edited, targets, texts)
    np.testing.assert_allclose(got["clip_i"], ref["sim_image"], atol=1e-5)
    np.testing.assert_allclose(got["clip_t"], ref["sim_1"], atol=1e-5)
    assert np.ptp(got["clip_t"]) > 1e-3 and np.all(got["clip_i"] < 0.9999)   # not constants, not trivially 1
    same = mb.turn_scores(scorer, targets, targets, texts)
    np.testing.assert_allclose(same["clip_i"], 1.0, atol=1e-5)
    np.testing.assert_array_equal(same["l1"], 0.0)
    with pytest.raises(ValueError, match="as many of each"):
        mb.turn_scores(scorer, edited, targets[:2], texts)


def test_summarize_all_final_and_per_turn():
    scores = {m: np.array([1.0, 2.0, 3.0, 4.0, 5.0]) * k for k, m in enumerate(mb.METRICS, 1)}
    sessions, turns = ["a", "a", "a", "b", "b"], [1, 2, 3, 1, 2]
    s = mb.summarize(scores, sessions, turns)
    assert s["all_turns"]["l1"] == 3.0 and s["all_turns"]["num"] == 5
    assert s["final_turn"]["l1"] == (3.0 + 5.0) / 2 and s["final_turn"]["num"] == 2   # a's turn 3, b's turn 2
    assert s["by_turn"]["1"]["clip_t"] == 4 * (1.0 + 4.0) / 2 and s["by_turn"]["3"] == {
        **{m: 3.0 * k for k, m in enumerate(mb.METRICS, 1)}, "num": 1}


def _script():
    path = os.path.join(os.path.dirname(__file__), "..", "scripts", "evaluate_magicbrush.py")
    spec = importlib.util.spec_from_file_location("evaluate_magicbrush", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_script_scores_every_turn_and_names_missing_outputs(clip_dir, tmp_path, capsys):
    from ip2p_jax.data import builder as B

    src = tmp_path / "src"
    src.mkdir()
    sessions = {"11": 2, "12": 1, "13": 3}
    write(src / "dev.parquet", rows(sessions, True))
    B.build_dataset("magicbrush", str(src), str(tmp_path / "d"), name="mb", workers=1, progress=False)
    builder = B.open_dataset(str(tmp_path / "d"), "mb")
    out = tmp_path / "edits"
    out.mkdir()
    want_l1, n = [], 0
    for split in sorted(builder.info.splits):
        records = B.encoded_source(builder, split)
        for i in range(len(records)):
            target = np.asarray(Image.open(io.BytesIO(records[i]["edited_image"])).convert("RGB"))
            edit = tiny.random_image(24, 24, seed=100 + n)   # another size than the 32x32 targets
            Image.fromarray(edit).save(out / f"{split}-{i}.png")
            want_l1.append(mb.pixel_distances(edit, target)[0])
            n += 1
    captions = {"11": {"11-input.png": "x", "11-output1.png": "a dog", "11-output2.png": "a dog in snow"}}
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    script = _script()
    args = ["--tfds", str(tmp_path / "d"), "--tfds-name", "mb", "--split", "all", "--outputs", str(out),
            "--clip", clip_dir, "--captions", str(tmp_path / "captions.json"), "--out", str(tmp_path / "r.json")]
    assert script.main(args) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert json.loads(capsys.readouterr().out)["all_turns"] == result["all_turns"]
    per = result["per_turn"]
    assert len(per) == sum(sessions.values()) == result["all_turns"]["num"]
    assert sorted((p["session"], p["turn"]) for p in per) == sorted(
        (s, t) for s, k in sessions.items() for t in range(1, k + 1))
    np.testing.assert_allclose([p["l1"] for p in per], want_l1, rtol=0, atol=1e-12)
    assert result["all_turns"]["l1"] == pytest.approx(np.mean(want_l1), abs=1e-12)
    assert result["final_turn"]["num"] == 3 and sorted(result["by_turn"]) == ["1", "2", "3"]
    assert {p["text_source"] for p in per if p["session"] == "11"} == {"caption"}
    assert {p["text_source"] for p in per if p["session"] != "11"} == {"instruction"}
    # a missing output is one clear error line naming the file
    os.remove(out / f"{per[0]['split']}-{per[0]['index']}.png")
    assert script.main(args) == 2
    err = capsys.readouterr().err
    assert f"{per[0]['split']}-{per[0]['index']}.png: missing" in err and err.count("\n") == 1
