"""The synthetic shapes world: grammar, instructions, pairs, on-disk layout, scorer."""
from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ip2p_jax.datagen.shapes import (EDIT_TYPES, SHAPES, Edit, Layout, Obj, Scene, SceneError,
                                     aggregate, apply_edit, caption, coverage, diff_scenes,
                                     generate_prompts, make_example, parse_caption, parse_instruction,
                                     read_prompts, render_array, sample_scene, score_edit, write_pairs)
from ip2p_jax.datagen.shapes import instructions as ins
from ip2p_jax.datagen.shapes import pairs as pairs_mod
from ip2p_jax.datagen.shapes.evaluate import evaluate, held_out_examples, summary
from ip2p_jax.datagen.shapes.render import slot_mask
from ip2p_jax.datagen.shapes.world import CELL_CENTERS, HALF_SIZE

ROOT = Path(__file__).resolve().parents[1]


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def prompts():
    return list(generate_prompts(360, seed=3))


@pytest.fixture(scope="module")
def examples(prompts):
    return [make_example(p, seed=100 + i) for i, p in enumerate(prompts[:180])]


# ------------------------------------------------------------------ scenes and captions

def test_caption_round_trip_and_rejects_bad_captions():
    rng = np.random.default_rng(0)
    for _ in range(300):
        scene = sample_scene(rng)
        assert parse_caption(caption(scene)) == scene
    assert caption(Scene("orange", (Obj("circle", "red", "large"), Obj("square", "blue", "small")))) == \
        "a large red circle and a small blue square on an orange background"
    bad = ["a large red circle on a red background",                    # object = background colour
           "a large red circle and a small red circle on a blue background",  # indistinguishable
           "a huge red circle on a blue background",                    # not in the grammar
           "a large red circle and a small blue star and a small green square on a white background",
           "a large red circle, a small blue star on a white background"]
    for text in bad:
        with pytest.raises(SceneError, match="caption|red circle"):
            parse_caption(text)


def test_layout_keeps_objects_inside_and_apart():
    rng = np.random.default_rng(1)
    for seed in range(60):
        layout = Layout.from_seed(seed)
        scene = layout.place(sample_scene(rng, 3))
        big = Scene(scene.background, tuple(dataclasses.replace(o, size="large") for o in scene.objects))
        covered = sum((coverage(o) > 0).astype(int) for o in big.objects)
        assert covered.max() == 1  # no two objects touch, even when all are large
        assert sum(slot_mask(o, 64).astype(int) for o in big.objects).max() == 1
        for o in big.objects:  # fully inside: its whole ideal area is on the canvas
            h = HALF_SIZE["large"]
            assert h <= o.center[0] <= 1 - h and h <= o.center[1] <= 1 - h
        assert layout.free_center(scene) not in {o.center for o in scene.objects}
        assert Layout.from_seed(seed) == layout and len(set(layout.cell_order)) == len(CELL_CENTERS)


def test_renderer_is_antialiased_at_every_resolution():
    scene = Layout.from_seed(5).place(Scene("white", (Obj("star", "blue", "large"), Obj("circle", "red", "small"))))
    for res in (64, 128, 256):
        img = render_array(scene, res)
        assert img.shape == (res, res, 3) and img.dtype == np.uint8
        colours = {tuple(c) for c in img.reshape(-1, 3)}
        assert {(255, 255, 255), (35, 70, 225), (220, 30, 30)} <= colours and len(colours) > 10
        # the blue star covers about its ideal share of the image, independent of resolution
        share = (coverage(scene.objects[0], res)).sum() / res**2
        assert share == pytest.approx(coverage(scene.objects[0], 256).sum() / 256**2, rel=0.03)
        assert np.array_equal(img, render_array(scene, res))


# ------------------------------------------------------------------ stage (a): instructions

def test_prompts_are_consistent_and_varied(prompts):
    templates_used = defaultdict(set)
    for p in prompts:
        assert set(p) == {"input", "edit", "output", "url"} and p["url"].startswith("shapes://3/")
        before, after = parse_caption(p["input"]), parse_caption(p["output"])
        edit = diff_scenes(before, after)
        assert apply_edit(before, edit) == after               # the output caption is the edited scene
        assert parse_instruction(before, p["edit"]) == edit    # the instruction names exactly that edit
        for key, template, regex in ins._PARSERS:
            if regex.fullmatch(p["edit"]):
                templates_used[key.split(":")[0]].add(template)
    assert set(templates_used) == set(EDIT_TYPES)
    for edit_type, used in templates_used.items():
        assert len(used) >= 4, (edit_type, used)
    assert len({(p["input"], p["edit"], p["output"]) for p in prompts}) == len(prompts)
    assert list(generate_prompts(20, seed=3)) == prompts[:20]
    assert list(generate_prompts(20, seed=4)) != prompts[:20]


def test_instructions_name_objects_unambiguously():
    scene = Scene("white", (Obj("circle", "red", "large"), Obj("circle", "blue", "small"),
                            Obj("star", "red", "small")))
    assert ins.reference_options(scene, 0) == ["red circle", "large circle", "large red circle"]
    assert ins.reference_options(scene, 2) == ["star", "red star", "small star", "small red star"]
    with pytest.raises(SceneError, match="names 2 objects"):
        parse_instruction(scene, "make the circle green")
    assert parse_instruction(scene, "turn the red circle blue") == Edit("recolor", 0, "blue")
    assert parse_instruction(scene, "shrink the large circle") == Edit("resize", 0, "small")
    assert parse_instruction(scene, "change the color of the circle to blue".replace("circle", "star")) \
        == Edit("recolor", 2, "blue")
    with pytest.raises(SceneError, match="not one edit apart|exactly one edit"):
        diff_scenes(scene, Scene("black", scene.objects[:2]))


# ------------------------------------------------------------------ stage (b): pairs

def test_pairs_differ_only_where_the_edit_says(examples):
    for ex in examples:
        a, b = ex.input_array.astype(int), ex.output_array.astype(int)
        diff = np.abs(a - b).max(-1) > 0
        assert diff.any(), ex.prompt
        if ex.edit.type == "background":
            solid = np.zeros_like(diff)
            for o in ex.input_scene.objects:
                solid |= coverage(o) == 1.0
            assert not (diff & solid).any()          # object interiors untouched
            assert (diff | solid).all()              # every other pixel changed colour
        else:
            allowed = np.zeros_like(diff)
            if ex.edit.index is not None:
                allowed |= coverage(ex.input_scene.objects[ex.edit.index]) > 0
            if ex.edit.type != "remove":
                changed = ex.output_scene.objects[-1 if ex.edit.type == "add" else ex.edit.index]
                allowed |= coverage(changed) > 0
            assert not (diff & ~allowed).any(), ex.prompt
        # unchanged objects are at the same place in both scenes
        kept = {o.center for o in ex.input_scene.objects} & {o.center for o in ex.output_scene.objects}
        assert len(kept) >= len(ex.input_scene.objects) - (ex.edit.type == "remove")


def test_written_layout_is_the_authors_and_resumes(tmp_path, prompts):
    subset = prompts[:10]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in subset))
    assert load_script("shapes_prompts").main(["--num", "7", "--seed", "1", "--out", str(tmp_path / "q.jsonl"),
                                               "--no-progress"]) == 0
    assert read_prompts(tmp_path / "q.jsonl") == list(generate_prompts(7, 1))
    pairs_cli = load_script("shapes_pairs")
    out = tmp_path / "pairs"
    args = ["--prompts", str(tmp_path / "p.jsonl"), "--out", str(out), "--samples-per-prompt", "2", "--no-progress"]
    assert pairs_cli.main(args) == 0
    seeds = json.loads((out / "seeds.json").read_text())
    assert [name for name, _ in seeds] == [f"{i:07d}" for i in range(10)]
    assert sorted(os.listdir(out)) == sorted([name for name, _ in seeds] + ["seeds.json"])
    for i, (name, ss) in enumerate(seeds):
        d = out / name
        assert len(ss) == 2 and ss == sorted(ss)
        assert sorted(os.listdir(d)) == sorted([f"{s}_{k}.jpg" for s in ss for k in (0, 1)]
                                               + ["metadata.jsonl", "prompt.json"])
        assert json.loads((d / "prompt.json").read_text()) == subset[i]
        meta = [json.loads(line) for line in (d / "metadata.jsonl").read_text().splitlines()]
        assert [m["seed"] for m in meta] == ss
        ex = make_example(subset[i], ss[0])
        assert meta[0]["edit_type"] == ex.edit.type and Scene.from_dict(meta[0]["output_scene"]) == ex.output_scene
        edited = Image.open(d / f"{ss[0]}_1.jpg")
        assert edited.size == (64, 64)
        assert np.abs(np.asarray(edited).astype(int) - ex.output_array).mean() < 2.0
        assert score_edit(ex, edited)["success"]
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*.jpg")}
    assert pairs_cli.main(args) == 0  # rerun: nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.jpg")} == stamp
    stats = write_pairs(subset + prompts[10:12], out, samples_per_prompt=2, progress=False)
    assert (stats.written, stats.skipped, stats.pairs) == (2, 10, 24)
    with pytest.raises(SceneError, match="different prompt"):
        write_pairs(prompts[20:21], out, samples_per_prompt=2, progress=False)
    bad = dict(prompts[0], output="a large red dog on a white background")
    with pytest.raises(SceneError, match=r"prompt 1 \('.*'\): not a shapes-world caption: 'a large red dog"):
        write_pairs([prompts[0], bad], tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()


def test_crash_leaves_no_half_written_dir(tmp_path, prompts, monkeypatch):
    out = tmp_path / "pairs"
    real = pairs_mod.make_example
    seeds_done = []

    def flaky(prompt, seed, resolution=64):
        if prompt is prompts[3] and seed != 0:  # seed 0: the up-front check of every line
            seeds_done.append(seed)
            if len(seeds_done) == 2:  # dies in prompt 3, after its first pair's images were written
                raise KeyboardInterrupt
        return real(prompt, seed, resolution)

    monkeypatch.setattr(pairs_mod, "make_example", flaky)
    with pytest.raises(KeyboardInterrupt):
        write_pairs(prompts[:6], out, samples_per_prompt=2, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["0000000", "0000001", "0000002"]  # nothing half-written
    monkeypatch.setattr(pairs_mod, "make_example", real)
    stats = write_pairs(prompts[:6], out, samples_per_prompt=2, progress=False)
    assert (stats.written, stats.skipped) == (3, 3) and not (out / ".partial").exists()
    assert [n for n, _ in json.loads((out / "seeds.json").read_text())] == [f"{i:07d}" for i in range(6)]


def test_killed_process_leaves_only_finished_dirs(tmp_path, prompts):
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps(p) + "\n" for p in prompts[:300]))
    out = tmp_path / "pairs"
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "shapes_pairs.py"), "--prompts", str(src),
                             "--out", str(out), "--resolution", "256", "--samples-per-prompt", "2",
                             "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and len([p for p in out.iterdir() if not p.name.startswith(".")]) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = [p for p in out.iterdir() if not p.name.startswith(".") and p.name != "seeds.json"]
    assert finished
    for d in finished:  # every dir that counts as finished is complete
        assert {"prompt.json", "metadata.jsonl"} <= set(os.listdir(d)) and len(list(d.glob("*.jpg"))) == 4
    n = len(finished)
    assert n < 300  # it was stopped part-way
    stats = write_pairs(read_prompts(src)[:n + 2], out, samples_per_prompt=2, resolution=256, progress=False)
    assert stats.written == 2 and stats.skipped == n
    assert not (out / ".partial").exists()


# ------------------------------------------------------------------ the scorer

def test_ground_truth_scores_full_and_identity_zero(examples):
    gt, jpeg, identity = [], [], []
    for ex in examples:
        gt.append(score_edit(ex, ex.output_image()))
        buf = io.BytesIO()
        ex.output_image().save(buf, "JPEG", quality=95, subsampling=0)  # as the pair writer
        jpeg.append(score_edit(ex, Image.open(buf)))
        identity.append(score_edit(ex, ex.input_array))
    for name, rows, want in (("gt", gt, 1.0), ("jpeg", jpeg, 1.0), ("identity", identity, 0.0)):
        table = aggregate(rows)
        assert set(table) == set(EDIT_TYPES) | {"overall"}
        for edit_type, r in table.items():
            assert r["success"] == want, (name, edit_type, r)
            assert r["preserved"] == 1.0, (name, edit_type, r)
    assert aggregate(gt)["overall"]["psnr_unchanged"] == 100.0
    assert aggregate(jpeg)["overall"]["psnr_unchanged"] > 35
    assert aggregate(identity)["overall"]["psnr_unchanged"] == 100.0


def _wrong(ex, **change):
    """The expected output with the edited object changed (e.g. the wrong colour)."""
    objs = list(ex.output_scene.objects)
    i = len(objs) - 1 if ex.edit.type == "add" else ex.edit.index
    objs[i] = dataclasses.replace(objs[i], **change)
    return render_array(Scene(ex.output_scene.background, tuple(objs)))


def _first(examples, edit_type):
    return [ex for ex in examples if ex.edit.type == edit_type][:6]


def test_wrong_edits_fail(examples):
    for ex in _first(examples, "recolor"):
        obj = ex.input_scene.objects[ex.edit.index]
        wrong = next(c for c in ("green", "purple", "black", "yellow")
                     if c not in (ex.edit.value, obj.color, ex.input_scene.background))
        s = score_edit(ex, _wrong(ex, color=wrong))
        assert not s["success"] and s["found"] == wrong and s["psnr_unchanged"] == 100.0
    for ex in _first(examples, "shape"):
        other = next(s for s in SHAPES if s not in (ex.edit.value, ex.input_scene.objects[ex.edit.index].shape))
        assert score_edit(ex, _wrong(ex, shape=other))["found"] == other
    for ex in _first(examples, "add"):
        assert not score_edit(ex, _wrong(ex, size="small" if ex.edit.value.size == "large" else "large"))["success"]
        assert not score_edit(ex, _wrong(ex, shape=next(s for s in SHAPES if s != ex.edit.value.shape)))["success"]
    # add is judged anywhere in free space: the new object in another free cell counts
    for ex in _first(examples, "add"):
        layout = Layout.from_seed(ex.seed)
        used = {o.center for o in ex.output_scene.objects}
        elsewhere = [layout.centers[c] for c in layout.cell_order if layout.centers[c] not in used]
        if elsewhere:
            assert score_edit(ex, _wrong(ex, center=elsewhere[0]))["success"]
    # an edit that also damages another object is a success that did not preserve the rest
    ex = next(e for e in examples if e.edit.type == "remove" and len(e.output_scene.objects) >= 1)
    keep = ex.output_scene.objects[0]
    recoloured = next(c for c in ("green", "purple", "black") if c not in (keep.color, ex.output_scene.background))
    objs = (dataclasses.replace(keep, color=recoloured),) + ex.output_scene.objects[1:]
    s = score_edit(ex, render_array(Scene(ex.output_scene.background, objs)))
    assert s["success"] and not s["preserved"] and s["psnr_unchanged"] < 30


def test_scorer_accepts_other_sizes_and_float_arrays(examples):
    ex = examples[0]
    assert score_edit(ex, ex.output_image().resize((256, 256), Image.NEAREST))["success"]
    assert score_edit(ex, ex.output_array.astype(np.float32) / 255)["success"]
    with pytest.raises(ValueError, match="HxWx3"):
        score_edit(ex, np.zeros((64, 64)))


# ------------------------------------------------------------------ evaluation

def test_evaluate_with_an_oracle_and_the_script_wiring(monkeypatch, capsys):
    examples = held_out_examples(24, seed=7)
    assert [e.prompt for e in held_out_examples(24, seed=7, exclude=[examples[0].prompt])][0] != examples[0].prompt
    oracle = {e.instruction + e.prompt["input"]: e.output_image() for e in examples}
    by_input = {e.input_image().tobytes(): e for e in examples}

    def edit_fn(images, instructions):
        return [oracle[t + by_input[im.tobytes()].prompt["input"]] for im, t in zip(images, instructions)]

    scores, edited = evaluate(edit_fn, examples)
    result = summary(scores)
    assert result["model"]["overall_success"] == 1.0 and result["identity"]["overall_success"] == 0.0
    assert len(edited) == 24

    calls = {}

    class FakePipeline:  # identity editor with the pipeline's interface
        @classmethod
        def from_pretrained(cls, path):
            calls["path"] = path
            return cls()

        def edit(self, images, instructions, **kwargs):
            calls.update(kwargs)
            return type("Result", (), {"images": [im.copy() for im in images]})()

        def autoencode(self, images):   # a lossless autoencoder: the ceiling is the ground truth
            return [im.copy() for im in images]

    fake = type(sys)("ip2p_jax.pipeline")
    fake.EditPipeline = FakePipeline
    monkeypatch.setitem(sys.modules, "ip2p_jax.pipeline", fake)
    rc = load_script("evaluate_shapes").main(["--model", "M", "--num", "12", "--seed", "5", "--steps", "3",
                                              "--text-scale", "6", "--image-scale", "1.2", "--no-progress",
                                              "--autoencoder-ceiling"])
    assert rc == 0
    assert calls["path"] == "M" and calls["steps"] == 3 and calls["text_scale"] == 6.0
    assert calls["image_scale"] == 1.2 and calls["seed"] == 5 and calls["resolution"] == 64
    out = capsys.readouterr().out.strip().splitlines()
    last = json.loads(out[-1])
    assert last["model"] == last["identity"] and last["identity"]["overall_success"] == 0.0
    assert last["autoencoder"]["overall_success"] == 1.0
    assert "identity success" in out[0]


@pytest.mark.slow
def test_evaluate_script_with_the_real_pipeline(tmp_path, capsys):
    pytest.importorskip("ip2p_jax.pipeline", reason="ip2p_jax.pipeline not written yet")
    import tiny

    model = tiny.save_pipeline(str(tmp_path / "model"))
    rc = load_script("evaluate_shapes").main(["--model", model, "--num", "4", "--steps", "2", "--no-progress"])
    assert rc == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["model"]["n"] == 4 and 0.0 <= last["model"]["overall_success"] <= 1.0


# ------------------------------------------------------------------ the TFDS builder reads the layout

def test_tfds_builder_reads_the_written_layout(tmp_path, prompts):
    builder = pytest.importorskip("ip2p_jax.data.builder",
                                  reason="the TFDS builder (ip2p_jax.data.builder) is not written yet")
    import tensorflow_datasets as tfds

    out = tmp_path / "pairs"
    write_pairs(prompts[:12], out, samples_per_prompt=2, progress=False)
    report = builder.build_dataset("authors", str(out), str(tmp_path / "tfds"), "shapes", workers=1,
                                   progress=False)
    assert report.total == 24 and report.rejected == 0
    ds_builder = builder.open_dataset(str(tmp_path / "tfds"), "shapes")
    records = []
    for split in ds_builder.info.splits:
        ds = ds_builder.as_data_source(split, decoders={"input_image": tfds.decode.SkipDecoding(),
                                                        "edited_image": tfds.decode.SkipDecoding()})
        records += [ds[i] for i in range(len(ds))]
    assert len(records) == 24
    by_text = {(p["input"], p["edit"], p["output"]): i for i, p in enumerate(prompts[:12])}
    for r in records:
        texts = tuple(r[k].decode() if isinstance(r[k], bytes) else r[k]
                      for k in ("input_caption", "instruction", "edited_caption"))
        d = out / f"{by_text[texts]:07d}"
        assert r["edited_image"] in {p.read_bytes() for p in d.glob("*_1.jpg")}
        assert r["input_image"] in {p.read_bytes() for p in d.glob("*_0.jpg")}
