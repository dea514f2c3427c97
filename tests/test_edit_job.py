"""Dataset edits (`ip2p edit --manifest`): two processes (gloo, 2 CPU devices each) against one
process of 4 devices and direct edit() calls; bad rows; a SIGKILLed job resumed; the proof that
the sharded edit does 1/N of the batch per device; folder inputs decoded as their batch comes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import weakref

import numpy as np
import pytest
from PIL import Image

import edit_fixtures as fx
import tiny
from train_helpers import free_port, finish as _finish, logged_writes as _writes, subprocess_env

N_ROWS = 12          # valid rows; plus the bad ones below
WORKER = textwrap.dedent("""
    import json, os, sys, time
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from ip2p_jax import cli, edit_job
    log, delay, argv = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
    real_write = edit_job._write

    def write(out, row_id, image, settings):   # record who wrote what; optionally slow, to be killed
        real_write(out, row_id, image, settings)
        with open(log, "a") as f:
            f.write(json.dumps([jax.process_index(), row_id]) + "\\n")
        time.sleep(delay)

    edit_job._write = write
    sys.exit(cli.main(argv))
""")



@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = fx.tiny_model_dir(tmp_path_factory)
    root = tmp_path_factory.mktemp("job")
    imgs = root / "images"
    imgs.mkdir()
    lines, rows = [], []
    for i in range(N_ROWS):
        name = f"im{i}.png"
        Image.fromarray(tiny.random_image(fx.H, fx.W, seed=i)).save(imgs / name)
        row = {"image": f"images/{name}", "instruction": fx.INSTRUCTION if i % 3 else "add snow",
               "seed": 100 + i, "id": f"r{i:02d}"}
        if i % 4 == 1:
            row["text_scale"] = 5.0
        if i == 7:
            row["image_scale"] = 1.2
        lines.append(json.dumps(row))
        rows.append(row)
        if i == 4:
            lines.append(json.dumps({"image": "images/missing.png", "instruction": "x", "id": "gone"}))   # line 6
        if i == 8:
            lines.append("{not json")                                                                    # line 11
            lines.append(json.dumps({"image": "images/im0.png", "instruction": "x", "id": "r00"}))         # line 12
    (root / "rows.jsonl").write_text("\n".join(lines) + "\n")
    script = root / "worker.py"
    script.write_text(WORKER)
    return {"model": model, "root": root, "rows": rows, "script": str(script)}


def _argv(setup, out, *extra):
    return ["edit", "--model", setup["model"], "--manifest", str(setup["root"] / "rows.jsonl"), "--out", str(out),
            "--steps", str(fx.STEPS), "--resize", "keep", "--dtype", "fp32", "--quiet", *extra]


def _start(setup, log, argv, devices, delay=0.0):
    env = subprocess_env(devices=devices, cache_dir=str(setup["root"] / "xla"))
    return subprocess.Popen([sys.executable, setup["script"], str(log), str(delay), *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _pixels(out) -> dict:
    return {f[:-4]: np.asarray(Image.open(os.path.join(out, f))) for f in sorted(os.listdir(out)) if f.endswith(".png")}


@pytest.fixture(scope="module")
def one_process(setup):
    """The reference: one process of 4 devices."""
    out, log = setup["root"] / "one", setup["root"] / "one.log"
    text = _finish([_start(setup, log, _argv(setup, out), devices=4)])[0]
    return {"out": out, "log": log, "text": text}


def test_two_processes_write_their_own_rows_once_and_equal_one_process(setup, one_process):
    out, port = setup["root"] / "two", free_port()
    logs = [setup["root"] / f"two{i}.log" for i in range(2)]
    flags = ["--coordinator", f"127.0.0.1:{port}", "--num_processes", "2"]
    texts = _finish([_start(setup, logs[i], _argv(setup, out, *flags, "--process_id", str(i)), devices=2)
                     for i in range(2)])
    writes = _writes(logs[0]) + _writes(logs[1])
    ids = [r["id"] for r in setup["rows"]]
    assert sorted(w[1] for w in writes) == ids                              # each row written exactly once
    parsed = ids[:5] + ["gone"] + ids[5:]   # rows that parse; row i belongs to process i % 2
    assert all(pid == parsed.index(rid) % 2 for pid, rid in writes)         # by the process that owns it
    got, want = _pixels(out), _pixels(one_process["out"])
    assert sorted(got) == ids and sorted(want) == ids
    for rid in ids:
        np.testing.assert_array_equal(got[rid], want[rid], err_msg=rid)    # 2 x 2 devices = 1 x 4, bit for bit
    assert len({got[r].tobytes() for r in ids}) == len(ids)                 # not vacuous: all differ
    # the bad rows are named by line (manifest problems by process 0, a missing image by its owner)
    for text in (texts[0], one_process["text"]):
        assert "line 11: not JSON" in text and "line 12: duplicate id 'r00' (first on line 1)" in text, text
    for text in (texts[parsed.index("gone") % 2], one_process["text"]):
        assert "line 6: images/missing.png: no such file" in text, text
    assert "all 2 processes: 12 done, 0 skipped, 3 failed" in texts[0], texts[0]
    side = json.load(open(out / "r07.json"))
    assert side["seed"] == 107 and side["image_scale"] == 1.2 and side["text_scale"] == 7.5


def test_outputs_equal_direct_edit_calls(setup, one_process):
    from ip2p_jax.pipeline import EditPipeline

    pipe = EditPipeline.from_pretrained(setup["model"], dtype="fp32")
    rows = setup["rows"]
    res = pipe.edit([str(setup["root"] / r["image"]) for r in rows], [r["instruction"] for r in rows],
                    seed=[r["seed"] for r in rows], text_scale=[r.get("text_scale", 7.5) for r in rows],
                    image_scale=[r.get("image_scale", 1.5) for r in rows], steps=fx.STEPS, resize="keep",
                    batch_size=fx.BATCH, progress=False)
    got = _pixels(one_process["out"])
    for r, arr in zip(rows, res.arrays):
        diff = np.abs(got[r["id"]].astype(np.float64) / 255 - arr)
        assert diff.max() <= 0.5 / 255 + 1e-4, (r["id"], diff.max())      # the same edit, 8-bit rounded


def test_rerun_skips_and_strict_refuses(setup, one_process):
    before = {f: os.stat(one_process["out"] / f).st_mtime_ns for f in os.listdir(one_process["out"])}
    from ip2p_jax import cli

    assert cli.main(_argv(setup, one_process["out"])) == 0
    assert {f: os.stat(one_process["out"] / f).st_mtime_ns for f in os.listdir(one_process["out"])} == before
    assert cli.main(_argv(setup, setup["root"] / "strict", "--strict")) == 2
    assert not os.path.exists(setup["root"] / "strict" / "r00.png")


def test_killed_job_resumes_without_duplicates_gaps_or_truncation(setup, one_process):
    out, log = setup["root"] / "killed", setup["root"] / "killed.log"
    proc = _start(setup, log, _argv(setup, out), devices=4, delay=0.3)
    deadline = time.time() + 240
    while len(_writes(log)) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    first = [w[1] for w in _writes(log)]
    assert 3 <= len(first) < N_ROWS, first                                  # killed part way
    os.unlink(log)
    _finish([_start(setup, log, _argv(setup, out), devices=4)])
    second = [w[1] for w in _writes(log)]
    ids = [r["id"] for r in setup["rows"]]
    assert not set(second) & set(first)                                     # complete rows not redone
    assert sorted(set(first) | set(second)) == ids
    assert sorted(os.listdir(out)) == sorted([f"{i}.png" for i in ids] + [f"{i}.json" for i in ids])
    got, want = _pixels(out), _pixels(one_process["out"])
    for rid in ids:
        np.testing.assert_array_equal(got[rid], want[rid], err_msg=rid)    # none truncated or different
        json.load(open(out / f"{rid}.json"))


PER_DEVICE = textwrap.dedent("""
    import json, sys
    import jax
    assert jax.device_count() == 4
    from ip2p_jax import pipeline, sharding
    from ip2p_jax.pipeline import EditPipeline
    sys.path.insert(0, sys.argv[2])
    import edit_fixtures as fx

    def per_device(pipe, batch):
        calls = []
        real = pipe._edit_jit
        pipe._edit_jit = lambda *a: calls.append(a) or real(*a)
        pipe.edit(fx.sample_images(batch), fx.INSTRUCTION, seed=0, steps=2, resize="keep", batch_size=batch,
                  progress=False)
        compiled = real.lower(*calls[0]).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        text = compiled.as_text()
        rows = [n for n in range(1, batch + 1) if f"f32[{n},{fx.H},{fx.W},3]" in text]
        return {"flops": float(cost["flops"]), "pixel_rows": rows}

    four = per_device(EditPipeline.from_pretrained(sys.argv[1], dtype="fp32"), 8)
    one = per_device(EditPipeline.from_pretrained(sys.argv[1], dtype="fp32",
                                                  mesh=sharding.data_mesh(jax.devices()[:1])), 8)
    # negative control: maxdiffusion's failure, a "sharded" edit whose batch is replicated on every chip
    real_batch = sharding.batch_sharding
    sharding.batch_sharding = sharding.replicated
    try:
        pipeline.placement._COMPILED.clear()
        replicated = per_device(EditPipeline.from_pretrained(sys.argv[1], dtype="fp32"), 8)
    finally:
        sharding.batch_sharding = real_batch
    print("RESULT", json.dumps({"four": four, "one": one, "replicated": replicated}))
""")


def test_sharded_edit_does_a_quarter_of_the_batch_per_device(setup, tmp_path):
    script = tmp_path / "per_device.py"
    script.write_text(PER_DEVICE)
    proc = subprocess.run([sys.executable, str(script), setup["model"], os.path.dirname(__file__)],
                          env=subprocess_env(devices=4), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.split("RESULT ", 1)[1])
    four, one, rep = res["four"], res["one"], res["replicated"]
    ratio = four["flops"] / one["flops"]
    assert 0.2 <= ratio <= 0.3, res                     # each of 4 devices does 1/4 of the work
    assert four["pixel_rows"] == [2] and one["pixel_rows"] == [8], res   # per-device image batch: 8 / 4
    assert rep["flops"] / one["flops"] > 0.9, res       # the test catches an unsharded "sharded" edit


def test_folder_inputs_are_decoded_as_their_batch_comes(setup, tmp_path, monkeypatch):
    from ip2p_jax import cli
    from ip2p_jax.commands import edit as edit_cmd

    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(40):
        Image.fromarray(tiny.random_image(fx.H, fx.W, seed=i)).save(folder / f"{i:02d}.png")
    live, peak = [0], [0]
    real_load = edit_cmd.images.load_image

    def counting_load(*a, **k):
        img = real_load(*a, **k)
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        weakref.finalize(img, lambda: live.__setitem__(0, live[0] - 1))
        return img

    monkeypatch.setattr(edit_cmd.images, "load_image", counting_load)
    out = tmp_path / "out"
    argv = ["edit", "--model", setup["model"], "--image", str(folder), "--instruction", fx.INSTRUCTION, "--out",
            str(out), "--steps", "2", "--resize", "keep", "--batch-size", str(fx.BATCH), "--seed", "5", "--quiet"]
    assert cli.main(argv) == 0
    assert len([f for f in os.listdir(out) if f.endswith(".png")]) == 40
    assert 1 <= peak[0] <= fx.BATCH, peak                  # never more decoded inputs than one call's worth
    sides = sorted((json.load(open(out / f)) for f in os.listdir(out) if f.endswith(".json")),
                   key=lambda s: s["index"])
    assert [s["seed"] for s in sides] == list(range(5, 45))   # seeds as one call over all inputs


@pytest.mark.slow   # ~30 s on 2 busy cores (a TFDS build and one more compiled shape); `make test-slow`
def test_tfds_split_edit(setup, tmp_path):
    import data_helpers as dh
    from ip2p_jax import cli
    from ip2p_jax.data import builder as B

    expected = dh.write_authors(str(tmp_path / "src"), n_prompts=6, seeds=(1,))
    report = B.build_dataset("authors", str(tmp_path / "src"), str(tmp_path / "d"), name="pairs", progress=False)
    split = max(report.examples, key=report.examples.get)
    out = tmp_path / "out"
    argv = ["edit", "--model", setup["model"], "--tfds", f"{tmp_path / 'd'}:pairs/{split}", "--out", str(out),
            "--steps", "2", "--resize", "keep", "--quiet"]
    assert cli.main(argv) == 0
    n = report.examples[split]
    sides = [json.load(open(out / f"{split}-{i}.json")) for i in range(n)]
    assert len(os.listdir(out)) == 2 * n
    assert {s["instruction"] for s in sides} <= {e["instruction"] for e in expected.values()}
    assert [s["seed"] for s in sides] == list(range(n))       # base seed 0 + record index
    assert cli.main(argv[:4] + [f"{tmp_path / 'd'}:nothing/{split}"] + argv[5:]) == 2



def test_manifest_rows_and_their_problems(tmp_path):
    from ip2p_jax import edit_job

    lines = ['{"image": "a.png", "instruction": "x"}', "", '[1, 2]', '{"image": "a.png"}',
             '{"image": "a.png", "instruction": "x", "id": "../up"}', '{"image": "a.png", "instruction": "x", "seed": true}',
             '{"image": "a.png", "instruction": "x", "text_scale": NaN}', '{"image": "/abs/b.png", "instruction": "y", "id": "1"}',
             '{"image": "c.png", "instruction": "z", "seed": 4, "image_scale": 1.1}']
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    rows, bad = edit_job.read_manifest(str(tmp_path / "m.jsonl"), base_seed=10)
    assert [(r.line, r.id, r.seed) for r in rows] == [(1, "1", 11), (9, "9", 4)]
    assert rows[0].image == str(tmp_path / "a.png") and rows[1].image_scale == 1.1 and rows[1].text_scale is None
    reasons = {b.line: b.reason for b in bad}
    assert sorted(reasons) == [3, 4, 5, 6, 7, 8]
    assert "expected a JSON object" in reasons[3] and "'instruction'" in reasons[4] and "cannot name a file" in reasons[5]
    assert "seed" in reasons[6] and "text_scale" in reasons[7] and "duplicate id '1' (first on line 1)" in reasons[8]
    with pytest.raises(edit_job.JobError, match="cannot read the manifest"):
        edit_job.read_manifest(str(tmp_path / "nope.jsonl"))
