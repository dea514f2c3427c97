"""The pair stage over two processes (gloo on 127.0.0.1, 2 CPU devices each) against one process
on one device: each prompt dir is written once, by the process that owns it, and every file
(JPEGs, metadata.jsonl, prompt.json, seeds.json) equals the 1-device run's byte for byte;
a prompt finished before the run is skipped by its owner."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from test_datagen_pairs import PROMPTS, RES, STEPS, Model
from train_helpers import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
WORKER = textwrap.dedent("""
    import importlib.util, json, sys
    import jax
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
    spec = importlib.util.spec_from_file_location("generate_pairs", root + "/scripts/generate_pairs.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    sys.exit(cli.main(argv))
""")
N_PROMPTS, PER_DEVICE = 5, 2      # 5 prompts x 3 candidates; 2 pairs per device per call in both runs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    try:
        texts = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, text in zip(procs, texts):
        assert p.returncode == 0, text[-4000:]
    return texts


def _writes(log) -> list:
    return [tuple(json.loads(x)) for x in open(log).read().splitlines()] if os.path.exists(log) else []


def _files(out: Path) -> dict:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_two_processes_write_their_own_prompts_once_and_equal_one_device(setup):
    root = setup["root"]
    one = root / "one"
    _run(setup, [(root / "one.log", _argv(setup, one, 1), 1)])
    assert sorted(i for _, i in _writes(root / "one.log")) == list(range(N_PROMPTS))

    # the 2-process job resumes a folder in which prompt 3 (process 1's) is finished already
    two = root / "two"
    two.mkdir()
    shutil.copy(one / "generation.json", two / "generation.json")
    shutil.copytree(one / "0000003", two / "0000003")
    port, logs = _free_port(), [root / f"two{i}.log" for i in range(2)]
    flags = ["--coordinator", f"127.0.0.1:{port}", "--num_processes", "2"]
    texts = _run(setup, [(logs[i], _argv(setup, two, 2, *flags, "--process_id", str(i)), 2) for i in range(2)])

    writes = _writes(logs[0]) + _writes(logs[1])
    assert sorted(i for _, i in writes) == [0, 1, 2, 4]                 # each dir written once; 3 was done
    assert all(pid == i % 2 for pid, i in writes), writes               # by the process that owns it
    assert "process 1 of 2: 1 prompt dirs written (2 pairs kept of 3 sampled), 1 already finished" in texts[1]
    assert "process 0 of 2: 3 prompt dirs written (6 pairs kept of 9 sampled)" in texts[0]

    got, want = _files(two), _files(one)
    assert sorted(got) == sorted(want)
    assert len([f for f in want if f.endswith(".jpg")]) == 2 * 2 * N_PROMPTS
    for name in want:
        if name != "generation.json":
            assert got[name] == want[name], name                        # 2 x 2 devices = 1 x 1, bit for bit
    jpgs = [want[f] for f in want if f.endswith("_1.jpg")]
    assert len(set(jpgs)) == len(jpgs)                                   # not vacuous: all pairs differ
    assert json.loads(got["generation.json"])["settings"] == json.loads(want["generation.json"])["settings"]
    seeds = json.loads(got["seeds.json"])
    assert [n for n, _ in seeds] == [f"{i:07d}" for i in range(N_PROMPTS)] and all(len(s) == 2 for _, s in seeds)
