"""Two processes x 2 CPU devices (gloo on 127.0.0.1) train the tiny preset from disjoint data slices,
write one checkpoint (pmap, data parallel), then resume from it on a ('data','fsdp') = (2, 2) mesh whose
state is sharded across both processes, and checkpoint again.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from train_helpers import ROOT, free_port, run_once, subprocess_env, tiny_config, tokenizer_dir

FIRST, SECOND = 3, 5



def launch(tmp: str, workdir: str, tok: str, mode: str, steps: int) -> list[dict]:
    port = free_port()
    env = subprocess_env(devices=2)
    procs, outs = [], []
    for i in range(2):
        out = os.path.join(tmp, f"{mode}_{i}.json")
        outs.append(out)
        procs.append(subprocess.Popen([sys.executable, __file__, str(port), str(i), workdir, tok, mode, str(steps),
                                       out], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    return [dict(json.load(open(o)), log=log) for o, log in zip(outs, logs)]


def _compute(tmp: str) -> dict:
    tok = tokenizer_dir(tmp)
    workdir = os.path.join(tmp, "run")
    first = launch(tmp, workdir, tok, "pmap", FIRST)
    second = launch(tmp, workdir, tok, "jit", SECOND)
    return {"workdir": workdir, "first": first, "second": second, "tok": tok}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_once(tmp_path_factory, "multihost", _compute)


def test_processes_read_disjoint_slices(runs):
    p0, p1 = runs["first"]
    assert len(p0["batches"]) == len(p1["batches"]) == FIRST
    for b0, b1 in zip(p0["batches"], p1["batches"]):
        assert len(b0) == len(b1) == 4                       # global batch 8 = 2 hosts x 4
        assert not set(b0) & set(b1)                        # different examples on each host
    # the hosts' slices together are exactly the single-host stream's global batches
    from ip2p_jax.tokenizer import load_tokenizer
    from ip2p_jax.train.synthetic import SyntheticPairs

    single = SyntheticPairs(load_tokenizer(runs["tok"]), resolution=16, global_batch_size=8, seed=0)
    for step, (b0, b1) in enumerate(zip(p0["batches"], p1["batches"])):
        want = [_fingerprint(x) for x in next(single)["input_image"]]
        assert b0 + b1 == want, step


def test_one_checkpoint_written_and_resumed(runs):
    ck = os.path.join(runs["workdir"], "checkpoints")
    steps = sorted(int(n) for n in os.listdir(ck) if n.isdigit())
    assert steps == [FIRST, SECOND]
    for step in steps:
        files = sorted(os.listdir(os.path.join(ck, str(step), "data")))
        assert [f for f in files if f.endswith(".json")] == ["process_0-of-2.json", "process_1-of-2.json"]
    assert f"resumed from {ck}/{FIRST}" in runs["second"][0]["log"]   # process 0 prints
    for r in runs["second"]:
        assert r["step"] == SECOND
        assert r["batches_seen"] == SECOND - FIRST
    # both hosts saw the same (replicated) metrics, and the state on the fsdp mesh kept training
    a, b = runs["second"]
    assert a["metrics"]["loss"] == b["metrics"]["loss"] and np.isfinite(a["metrics"]["loss"])
    assert a["sharded_leaves"] > 0


def _fingerprint(image) -> str:
    pixels = np.round((np.asarray(image, np.float64) + 1) * 127.5).astype(np.uint8)
    return hashlib.sha1(pixels.tobytes()).hexdigest()[:16]


def worker(port: int, index: int, workdir: str, tok: str, mode: str, steps: int, out: str) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", 2, index)
    from ip2p_jax.train import loop

    c = tiny_config(tok)
    c.train.num_steps = steps
    c.checkpoint.every_steps = 100
    c.log.tensorboard = False
    c.log.every_steps = 1
    c.export.at_end = False
    c.data.num_examples = 0
    c.parallel.mode = mode
    if mode == "jit":
        c.parallel.fsdp, c.parallel.fsdp_min_size = 2, 0

    seen = []
    make = loop.make_train_data

    def recording(*args, **kwargs):
        data = make(*args, **kwargs)
        nxt = type(data).__next__

        class Recorder(type(data)):
            def __next__(self):
                batch = nxt(self)
                seen.append([_fingerprint(x) for x in batch["input_image"]])
                return batch
        data.__class__ = Recorder
        return data

    loop.make_train_data = recording
    sharded = []
    runner_cls = loop.make_runner

    def make_runner(*a, **k):
        r = runner_cls(*a, **k)
        step = r.step

        def wrapped(state, frozen, batch):
            out = step(state, frozen, batch)
            sharded[:] = [sum(1 for x in jax.tree.leaves(out[0].opt_state) if not x.is_fully_replicated)]
            return out
        r.step = wrapped
        return r

    loop.make_runner = make_runner
    loop.show_progress_logs()   # as `ip2p train` does: the loop's lines are log records
    result = loop.train(c, workdir)
    with open(out, "w") as f:
        json.dump({"step": result.step, "metrics": result.metrics, "batches": seen, "batches_seen": len(seen),
                   "sharded_leaves": sharded[0] if sharded else 0}, f)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    a = sys.argv[1:]
    worker(int(a[0]), int(a[1]), a[2], a[3], a[4], int(a[5]), a[6])
