"""One device, pmap on 4 devices, jit on a 2x2 ('data','fsdp') mesh and 4-way gradient accumulation give
the same train state for the same global batches; fsdp=2 halves each device's optimizer bytes; a
non-finite loss skips the update. Runs in a subprocess with 4 simulated CPU devices.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np
import pytest

from train_helpers import ROOT, run_once, tiny_config, tokenizer_dir, worker_result

STEPS = 3
# fp32 everywhere; the runs differ only in the order of floating-point sums (over devices and
# micro-batches): losses agree to ~5e-7 relative, AdamW moments to ~3e-8, and after 3 steps (lr 3e-3,
# largest param change ~9e-3) params and EMA to <= 4e-6 (Adam divides by sqrt(v): small gradients keep
# their rounding differences in the update). Tolerance: 1e-5, ~0.1% of the largest change.
# Adam's eps is raised from 1e-8 to 1e-6 here: CLIP's k_proj bias has an exactly-zero gradient (softmax
# ignores a constant added to every key), so its computed gradient is rounding noise (~1e-11) that
# Adam with eps=1e-8 normalises into +-lr steps of arbitrary sign, different for every summation order.
ATOL = 1e-5


def worker(out_path: str, tokenizer_dir: str) -> None:
    import jax
    from jax.sharding import AxisType, Mesh

    from ip2p_jax.train import parallel, state as st
    from ip2p_jax.train.build import build
    from ip2p_jax.train.data import make_train_data, model_inputs

    config = tiny_config(tokenizer_dir, optim__eps=1e-6)
    built = build(config)
    ocfg = st.OptimizerConfig.from_mapping(config.optim)
    tx, sched = st.make_optimizer(ocfg), st.learning_rate_schedule(ocfg)
    data = make_train_data(config, built.tokenizer)
    batches = [model_inputs(next(data)) for _ in range(STEPS)]
    one_device = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"),
                      axis_types=(AxisType.Auto,) * 2)

    def run(runner, extra=None):
        state = runner.init_state(built.params, config.seed)
        frozen = runner.put_frozen(built.frozen)
        metrics = []
        for b in batches + (extra or []):
            state, m = runner.step(state, frozen, runner.put_batch(b))
            metrics.append(runner.scalars(m))
        return state, metrics

    step_cfg = built.step_config
    accum_cfg = dataclasses.replace(step_cfg, grad_accum=4)
    runners = {
        "one": parallel.MeshRunner(built.models, step_cfg, tx, sched, one_device, 0),
        "pmap": parallel.PmapRunner(built.models, step_cfg, tx, sched),
        "mesh": parallel.MeshRunner(built.models, step_cfg, tx, sched, parallel.make_mesh(2, 2), 0),
        "accum": parallel.MeshRunner(built.models, accum_cfg, tx, sched, one_device, 0),
    }
    states, out = {}, {"losses": {}}
    for name, runner in runners.items():
        state, metrics = run(runner)
        states[name] = parallel.fetch(runner.to_global(state))
        out["losses"][name] = [m["loss"] for m in metrics]
        if name == "mesh":
            leaves = jax.tree.leaves(state.opt_state)
            out["opt_bytes_total"] = int(sum(x.nbytes for x in leaves))
            out["opt_bytes_per_device"] = [int(sum(s.data.nbytes for x in leaves for s in x.addressable_shards
                                                   if s.device == d)) for d in jax.devices()]
            out["params_sharded"] = sum(1 for x in jax.tree.leaves(state.params) if not x.is_fully_replicated)
            out["num_params_leaves"] = len(jax.tree.leaves(state.params))

    ref = states["one"]
    out["max_abs_diff"] = {name: {field: max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                                             for a, b in zip(jax.tree.leaves(getattr(ref, field)),
                                                             jax.tree.leaves(getattr(s, field))))
                                  for field in ("params", "ema_params", "opt_state")}
                           for name, s in states.items() if name != "one"}
    out["param_change"] = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                              for a, b in zip(jax.tree.leaves(ref.params), jax.tree.leaves(built.params)))
    out["steps"] = {name: int(s.step) for name, s in states.items()}

    # Non-finite: a NaN pixel makes the loss NaN -> the update is skipped, then a finite batch applies.
    from ip2p_jax.data.augment import to_float

    nan_batch = dict(batches[0], input_image=to_float(batches[0]["input_image"]))  # floats: a pixel can be NaN
    nan_batch["input_image"][0, 0, 0, 0] = np.nan
    runner = runners["one"]
    state = runner.init_state(built.params, config.seed)
    frozen = runner.put_frozen(built.frozen)
    before = parallel.fetch(runner.to_global(state))
    record = []
    for b in (nan_batch, nan_batch, batches[1]):
        state, m = runner.step(state, frozen, runner.put_batch(b))
        s = parallel.fetch(runner.to_global(state))
        same = all(np.array_equal(a, c) for a, c in zip(jax.tree.leaves((before.params, before.opt_state,
                                                                          before.ema_params)),
                                                         jax.tree.leaves((s.params, s.opt_state, s.ema_params))))
        record.append({**runner.scalars(m), "unchanged": same, "step": int(s.step), "updates": int(s.updates)})
    out["nonfinite"] = record
    with open(out_path, "w") as f:
        json.dump(out, f)


def _compute(folder: str) -> dict:
    out = os.path.join(folder, "out.json")
    return worker_result(__file__, [out, tokenizer_dir(folder)], out, devices=4)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return run_once(tmp_path_factory, "parallel", _compute)


@pytest.mark.parametrize("name", ["pmap", "mesh", "accum"])
def test_same_state_as_one_device(result, name):
    assert result["steps"][name] == STEPS
    assert result["param_change"] > 100 * ATOL       # training moved the params far more than the tolerance
    for field, diff in result["max_abs_diff"][name].items():
        assert diff <= ATOL, (name, field, diff)
    np.testing.assert_allclose(result["losses"][name], result["losses"]["one"], rtol=1e-5)


def test_fsdp_halves_optimizer_bytes(result):
    per_device = result["opt_bytes_per_device"]
    assert result["params_sharded"] > 0.5 * result["num_params_leaves"]
    # every device holds about half of the (replicated-size) optimizer state, not all of it
    for b in per_device:
        assert 0.45 * result["opt_bytes_total"] <= b <= 0.55 * result["opt_bytes_total"], (b, result["opt_bytes_total"])


def test_nonfinite_loss_skips_update(result):
    first, second, third = result["nonfinite"]
    assert first["finite"] == 0 and first["unchanged"] and first["nonfinite_run"] == 1
    assert second["finite"] == 0 and second["unchanged"] and second["nonfinite_run"] == 2
    assert second["nonfinite_total"] == 2 and second["step"] == 2 and second["updates"] == 0
    assert third["finite"] == 1 and not third["unchanged"]
    assert third["nonfinite_run"] == 0 and third["nonfinite_total"] == 2 and third["updates"] == 1


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    worker(sys.argv[1], sys.argv[2])
