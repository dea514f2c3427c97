"""The pair stage over two processes (gloo on 127.0.0.1, 2 CPU devices each) against one process
on one device, with the same pairs per device: each prompt dir is written once, by the process
that owns it; a prompt finished before the run is skipped by its owner; every other file (JPEGs,
metadata.jsonl with CLIP scores, prompt.json) is equal byte for byte, the float images before
8-bit conversion bit for bit, and seeds.json (written by process 0 from every process's dirs)
equal but for the skipped prompt."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from ip2p_jax.datagen.image_pairs import candidate_seeds
from test_datagen_pairs import PROMPTS, RES, STEPS, Model
from train_helpers import free_port, finish, logged_writes as _writes, subprocess_env

ROOT = Path(__file__).resolve().parents[1]
WORKER = textwrap.dedent("""
    import importlib.util, json, sys
    import jax
    import numpy as np
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from ip2p_jax.datagen.image_pairs import generate
    root, log, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    real_write = generate._write_prompt

    def write(out, work, settings, *, filtered):   # record who wrote which prompt dir
        n = real_write(out, work, settings, filtered=filtered)
        with open(log, "a") as f:
            f.write(json.dumps([jax.process_index(), work.index]) + "\\n")
        return n

    generate._write_prompt = write
    floats, real_generate = {}, generate.PairSampler.generate

    def sample(self, plan, noise, seeds, *args, **kwargs):   # keep each pair's float images, by seed
        result = real_generate(self, plan, noise, seeds, *args, **kwargs)
        floats.update(zip(map(int, seeds), generate.sharding.to_local(result, self.mesh)))
        return result

    generate.PairSampler.generate = sample
    spec = importlib.util.spec_from_file_location("generate_pairs", root + "/scripts/generate_pairs.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    code = cli.main(argv)
    np.savez(log + ".npz", **{str(k): v for k, v in floats.items()})
    sys.exit(code)
""")
N_PROMPTS, PER_DEVICE = 5, 2      # 5 prompts x 3 candidates; 2 pairs per device per call in both runs



@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from test_metrics_clip import save_tiny_clip

    root = tmp_path_factory.mktemp("pairs_mh")
    model = Model(str(root / "sd"))
    clip = save_tiny_clip(str(root / "clip"))
    prompts = root / "prompts.jsonl"
    more = [{"input": f"a {c} square", "edit": f"make it {d}", "output": f"a {d} square"}
            for c, d in [("green", "yellow"), ("black", "white")]]
    prompts.write_text("".join(json.dumps(p) + "\n" for p in (PROMPTS + more)[:N_PROMPTS]))
    script = root / "worker.py"
    script.write_text(WORKER)
    return {"root": root, "model": model.folder, "clip": clip, "prompts": prompts, "script": script}


def _argv(setup, out, devices, *extra):
    """devices: over all processes (--batch-size counts pairs of all of them)."""
    return ["--model", setup["model"], "--prompts", str(setup["prompts"]), "--out", str(out),
            "--clip-model", setup["clip"], "--clip-threshold", "-1", "--clip-dir-threshold", "-1",
            "--clip-img-threshold", "-1", "--samples-per-prompt", "3", "--keep", "2", "--steps", str(STEPS),
            "--resolution", str(RES), "--seed", "7", "--batch-size", str(PER_DEVICE * devices), "--dtype", "fp32",
            "--no-progress", *extra]


def _run(setup, runs, timeout=300) -> list[str]:
    """runs: [(log, argv, devices)] started together; returns their outputs."""
    procs = [subprocess.Popen([sys.executable, str(setup["script"]), str(ROOT), str(log), *argv],
                              env=subprocess_env(devices=devices), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for log, argv, devices in runs]
    return finish(procs, timeout)


def _files(out: Path) -> dict:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _floats(log, seeds) -> dict:
    with np.load(str(log) + ".npz") as f:
        return {s: f[str(s)] for s in seeds}


def test_two_processes_write_their_own_prompts_once_and_equal_one_device(setup):
    """Both jobs run at once: one process of 1 device, and two of 2 devices each (2 pairs per
    device in both), the latter in a folder where prompt 3 (process 1's) is finished already."""
    root = setup["root"]
    two = root / "two"
    (two / "0000003").mkdir(parents=True)    # a finished dir whose candidates were all filtered out
    (two / "0000003" / "prompt.json").write_text(setup["prompts"].read_text().splitlines()[3])
    (two / "0000003" / "metadata.jsonl").write_text("")
    port, logs = free_port(), [root / f"two{i}.log" for i in range(2)]
    flags = ["--coordinator", f"127.0.0.1:{port}", "--num_processes", "2"]
    texts = _run(setup, [(root / "one.log", _argv(setup, root / "one", 1), 1)]
                 + [(logs[i], _argv(setup, two, 4, *flags, "--process_id", str(i)), 2) for i in range(2)])[1:]
    assert sorted(i for _, i in _writes(root / "one.log")) == list(range(N_PROMPTS))

    writes = _writes(logs[0]) + _writes(logs[1])
    assert sorted(i for _, i in writes) == [0, 1, 2, 4]                 # each dir written once; 3 was done
    assert all(pid == i % 2 for pid, i in writes), writes               # by the process that owns it
    assert "process 1 of 2: 1 prompt dirs written (2 pairs kept of 3 sampled), 1 already finished" in texts[1]
    assert "process 0 of 2: 3 prompt dirs written (6 pairs kept of 9 sampled)" in texts[0]

    got, want = _files(two), _files(root / "one")
    same = [f for f in want if not f.startswith("0000003/") and f not in ("generation.json", "seeds.json")]
    assert sorted(got) == sorted(same + ["0000003/prompt.json", "0000003/metadata.jsonl", "generation.json",
                                         "seeds.json"])
    assert len([f for f in same if f.endswith(".jpg")]) == 2 * 2 * (N_PROMPTS - 1)
    for name in same:
        assert got[name] == want[name], name                            # 2 x 2 devices = 1 x 1, byte for byte
    jpgs = [want[f] for f in want if f.endswith("_1.jpg")]
    assert len(set(jpgs)) == len(jpgs)                                   # not vacuous: all pairs differ
    assert json.loads(got["generation.json"])["settings"] == json.loads(want["generation.json"])["settings"]
    seeds = json.loads(want["seeds.json"])
    assert [n for n, _ in seeds] == [f"{i:07d}" for i in range(N_PROMPTS)] and all(len(s) == 2 for _, s in seeds)
    assert json.loads(got["seeds.json"]) == [e for e in seeds if e[0] != "0000003"]

    # the float images of every sampled candidate (kept or not), before 8-bit conversion
    sampled = [s for i in (0, 1, 2, 4) for s in candidate_seeds(7, i, 3)]
    two_f = {**_floats(logs[0], sampled[:3] + sampled[6:]), **_floats(logs[1], sampled[3:6])}   # 0, 2, 4 | 1
    one_f = _floats(root / "one.log", sampled)
    assert all(np.array_equal(two_f[s], one_f[s]) for s in sampled)
    assert min(float(np.abs(two_f[a] - two_f[b]).max()) for a, b in zip(sampled, sampled[1:])) > 0.01


def test_a_refused_resume_stops_every_process(setup):
    """A dir of process 1's holds another prompt (seen by process 1 only): both processes stop
    with a message, process 0 is not left waiting in a collective."""
    root = setup["root"]
    wrong = root / "wrong"
    (wrong / "0000001").mkdir(parents=True)
    (wrong / "0000001" / "prompt.json").write_text(json.dumps({"input": "a", "edit": "b", "output": "c"}))
    (wrong / "0000001" / "metadata.jsonl").write_text("")
    flags = ["--coordinator", f"127.0.0.1:{free_port()}", "--num_processes", "2"]
    procs = [subprocess.Popen([sys.executable, str(setup["script"]), str(ROOT), str(root / f"wrong{i}.log"),
                               *_argv(setup, wrong, 4, *flags, "--process_id", str(i))],
                              env=subprocess_env(devices=2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    try:
        texts = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [2, 2], [t[-2000:] for t in texts]
    assert "0000001 holds a different prompt" in texts[1], texts[1][-4000:]
    assert "process 1 stopped the run" in texts[0], texts[0][-4000:]
    assert sorted(os.listdir(wrong)) == ["0000001"]                     # nothing written, not even generation.json
