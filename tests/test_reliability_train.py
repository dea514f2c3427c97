"""Training guards (issue 20, item 2; docs/reliability.md): the update itself is checked, checkpoints stay
finite, a failed resume keeps config.json and names the changed settings, one trainer per workdir, counts
checked with the key named. The loop runs a toy Task (a few-parameter quadratic) so each run compiles in
well under a second; the update step and the loop are the ones every task uses."""
from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train_helpers import tiny_config

from ip2p_jax.train.loop import TrainingStopped, train
from ip2p_jax.train.step import StepConfig
from ip2p_jax.train.task import Task
from ip2p_jax.train.workdir import LOCK, PREVIOUS_CONFIG, WorkdirError


def toy_loss(params, frozen, batch, step_key):
    return jnp.mean(jnp.square(params["w"] - jnp.mean(batch["image"]))), {}


class ToyData:
    def __init__(self):
        self.i = 0

    def __next__(self):
        self.i += 1
        return {"image": np.full((8, 2), 0.5, np.float32)}

    def get_state(self):
        return {"i": self.i}

    def set_state(self, s):
        self.i = s["i"]


def toy_task(config) -> Task:
    width = config.model.unet.block_out_channels[0]
    return Task(abstract_params={"w": jax.ShapeDtypeStruct((width,), np.float32)},
                init_params=lambda: {"w": np.arange(width, dtype=np.float32)}, frozen={},
                step_config=StepConfig(ema_decay=0.9), loss_fn=toy_loss, make_data=ToyData)


def toy_config(tmp_path, **overrides):
    c = tiny_config(str(tmp_path / "unused-tokenizer"), **overrides)
    c.log.tensorboard = False
    c.checkpoint.async_save = False
    c.checkpoint.every_steps = 1
    c.export.at_end = False
    c.model.unet.block_out_channels = (4, 8)     # the toy task's width: its one "architecture" setting
    return c


def read_checkpoint(workdir: str, step: int) -> dict:
    import warnings

    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state",),
                               options=ocp.CheckpointManagerOptions(read_only=True)) as m, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sharding info not provided")
        return m.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))["state"]


@pytest.mark.parametrize("mode", ["pmap", "jit"])
def test_nan_learning_rate_update_is_skipped(mode):
    """Loss and gradient are finite, the update is NaN: the step must leave the state as it was."""
    from ip2p_jax.train.parallel import fetch, make_runner
    from ip2p_jax.train.state import OptimizerConfig, learning_rate_schedule, make_optimizer

    cfg = OptimizerConfig(learning_rate=float("nan"))
    runner = make_runner(mode, None, StepConfig(ema_decay=0.9), make_optimizer(cfg), learning_rate_schedule(cfg),
                         loss_fn=toy_loss)
    state = runner.init_state({"w": np.arange(4, dtype=np.float32)}, 0)
    before = fetch(runner.to_global(state))
    state, metrics = runner.step(state, runner.put_frozen({}), runner.put_batch(next(ToyData())))
    after, m = fetch(runner.to_global(state)), runner.scalars(metrics)
    assert np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]) and m["finite"] == 0 and m["nonfinite_run"] == 1
    for name in ("params", "ema_params", "opt_state"):
        jax.tree.map(np.testing.assert_array_equal, after_part := getattr(after, name), getattr(before, name))
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(after_part))
    assert int(after.updates) == 0 and int(after.step) == 1
    # negative control: a finite rate does update
    cfg = OptimizerConfig(learning_rate=0.1)
    runner = make_runner(mode, None, StepConfig(ema_decay=0.9), make_optimizer(cfg), learning_rate_schedule(cfg),
                         loss_fn=toy_loss)
    state = runner.init_state({"w": np.arange(4, dtype=np.float32)}, 0)
    state, _ = runner.step(state, runner.put_frozen({}), runner.put_batch(next(ToyData())))
    assert not np.array_equal(fetch(runner.to_global(state)).params["w"], before.params["w"])


def test_nan_learning_rate_run_stops_with_finite_checkpoints(tmp_path):
    c = toy_config(tmp_path, optim__learning_rate=float("nan"), train__max_nonfinite_steps=3, train__num_steps=10)
    workdir = str(tmp_path / "run")
    with pytest.raises(TrainingStopped, match="keep their last finite update"):
        train(c, workdir, toy_task(c))
    steps = sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
    assert steps and steps[-1] >= 3
    for step in steps:
        state = read_checkpoint(workdir, step)
        for name in ("params", "ema_params", "opt_state"):
            assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state[name])), (step, name)
        np.testing.assert_array_equal(state["params"]["w"], np.arange(4, dtype=np.float32))
    assert not os.path.exists(os.path.join(workdir, LOCK))       # released on the way out


def test_changed_architecture_resume_names_the_setting_and_keeps_config(tmp_path):
    workdir = str(tmp_path / "run")
    c = toy_config(tmp_path, train__num_steps=2)
    train(c, workdir, toy_task(c))
    saved = open(os.path.join(workdir, "config.json")).read()
    c2 = toy_config(tmp_path, train__num_steps=4)
    c2.model.unet.block_out_channels = (8, 16)
    with pytest.raises(TrainingStopped, match=r"model\.unet\.block_out_channels: \[4, 8\] -> \[8, 16\]") as e:
        train(c2, workdir, toy_task(c2))
    assert "orbax" not in str(e.value).lower() and "checkpoint step 2" in str(e.value)
    assert open(os.path.join(workdir, "config.json")).read() == saved        # the run can still be exported
    # a resume that works writes the new config and keeps the previous one beside it
    c3 = toy_config(tmp_path, train__num_steps=3)
    assert train(c3, workdir, toy_task(c3)).step == 3
    assert json.load(open(os.path.join(workdir, "config.json")))["train"]["num_steps"] == 3
    assert open(os.path.join(workdir, PREVIOUS_CONFIG)).read() == saved


def test_second_trainer_on_a_workdir_is_refused_and_a_stale_lock_taken_over(tmp_path, caplog):
    workdir = tmp_path / "run"
    workdir.mkdir()
    c = toy_config(tmp_path, train__num_steps=1)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (workdir / LOCK).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "since": "x"}))
        with pytest.raises(WorkdirError, match=f"in use by another trainer \\(process {holder.pid} on"):
            train(c, str(workdir), toy_task(c))
        assert not (workdir / "checkpoints").exists() and (workdir / LOCK).exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone (a killed trainer): its lock is stale, taken over with a warning
    with caplog.at_level("WARNING", logger="ip2p_jax.train"):
        assert train(c, str(workdir), toy_task(c)).step == 1
    assert "stale lock" in caplog.text and not (workdir / LOCK).exists()


@pytest.mark.parametrize("key,value", [("train__batch_size", 0), ("train__batch_size", -1), ("train__grad_accum", 0),
                                       ("checkpoint__keep", 0)])
def test_counts_are_checked_with_the_key_named(tmp_path, key, value):
    c = toy_config(tmp_path, **{key: value})
    flag = "--config." + key.replace("__", ".")
    with pytest.raises(TrainingStopped, match=f"{flag}={value}: must be an integer >= "):
        train(c, str(tmp_path / "run"), toy_task(c))
    assert not (tmp_path / "run").exists()


def test_workdir_that_cannot_be_used(tmp_path, monkeypatch):
    c = toy_config(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(WorkdirError, match="exists and is not a folder"):
        train(c, str(tmp_path / "file"), toy_task(c))
    with pytest.raises(WorkdirError, match="cannot create the --workdir folder"):
        train(c, str(tmp_path / "file" / "run"), toy_task(c))
    ro = tmp_path / "ro"
    ro.mkdir()
    real_open = os.open

    def read_only(path, *a, **k):   # root ignores chmod: refuse the create itself
        if str(path).startswith(str(ro)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(WorkdirError, match=f"{ro}.*Read-only file system"):
        train(c, str(ro), toy_task(c))


MULTI_DEVICE = r'''
import sys
import jax, numpy as np
sys.path.insert(0, sys.argv[1])
from test_reliability_train import ToyData, toy_loss
from ip2p_jax.train.parallel import fetch, make_runner
from ip2p_jax.train.state import OptimizerConfig, learning_rate_schedule, make_optimizer
from ip2p_jax.train.step import StepConfig
assert jax.device_count() == 4
for lr in (float("nan"), 0.1):
    cfg = OptimizerConfig(learning_rate=lr)
    tx, sched = make_optimizer(cfg), learning_rate_schedule(cfg)
    finals = []
    for mode, kw in (("pmap", {}), ("jit", dict(mesh_data=2, fsdp=2, fsdp_min_size=1))):
        runner = make_runner(mode, None, StepConfig(ema_decay=0.9), tx, sched, loss_fn=toy_loss, **kw)
        state = runner.init_state({"w": np.arange(4096 * 2, dtype=np.float32)}, 0)
        state, metrics = runner.step(state, runner.put_frozen({}), runner.put_batch(next(ToyData())))
        m, final = runner.scalars(metrics), fetch(runner.to_global(state))
        assert m["finite"] == (0 if lr != lr else 1), (mode, m)
        changed = not np.array_equal(final.params["w"], np.arange(4096 * 2, dtype=np.float32))
        assert changed == (lr == lr), (mode, lr)
        finals.append(final)
    for a, b in zip(jax.tree.leaves(finals[0]), jax.tree.leaves(finals[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
print("OK")
'''


def test_update_guard_is_the_same_on_four_devices_pmap_and_fsdp(tmp_path):
    from train_helpers import HERE, ROOT, subprocess_env

    env = dict(subprocess_env(devices=4), PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", MULTI_DEVICE, HERE], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
