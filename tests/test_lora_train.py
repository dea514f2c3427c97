"""LoRA training through the one training loop (configs/train.py:lora_tiny, CPU, fp32): the loss goes down,
only adapter leaves are trained (the base stays bit-identical), the optimizer state and the EMA are
adapter-sized, checkpoints hold adapters only and the export is a diffusers LoRA file; under pmap and
the FSDP mesh (4 simulated devices, subprocess) the LoRA step equals one device's."""
from __future__ import annotations

import json
import logging
import os
import sys

import numpy as np
import pytest

from train_helpers import CONFIG, ROOT, run_once, tokenizer_dir, worker_result

log = logging.getLogger(__name__)
ATOL = 1e-5   # as tests/test_train_parallel.py: only the order of fp32 sums differs


def lora_config(tok: str, **overrides):
    from ip2p_jax.train.configs import load_config

    c = load_config(CONFIG + ":lora_tiny")
    c.model.tokenizer = tok
    c.log.tensorboard = False
    for key, value in overrides.items():
        section, name = key.split("__")
        c[section][name] = value
    return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from ip2p_jax.train.loop import train

    folder = tmp_path_factory.mktemp("lora_run")
    config = lora_config(tokenizer_dir(str(folder)))
    workdir = str(folder / "wd")
    result = train(config, workdir, return_state=True)
    return config, workdir, result


def _fixed_batch_loss(task, params, config):
    """The mean loss over 8 step keys on the first training batch (the same noise for every params)."""
    import jax

    from ip2p_jax.train.data import make_train_data, model_inputs
    from ip2p_jax.train.parallel import add_example_ids

    data = make_train_data(config, task.tokenizer)
    batch = model_inputs(next(data))
    batch = add_example_ids(batch, len(batch["input_ids"]))
    loss = jax.jit(task.loss_fn)
    return float(np.mean([loss(params, task.frozen, batch, jax.random.key(k))[0] for k in range(8)]))


def test_loss_down_only_adapters_trained(run):
    import jax
    from flax import traverse_util

    from ip2p_jax import adapters
    from ip2p_jax.train.build import build
    from ip2p_jax.train.lora import BASE, lora_task
    from ip2p_jax.train.state import abstract_train_state, make_optimizer, OptimizerConfig

    config, workdir, result = run
    built = build(config)
    task = lora_task(config, built)
    state = result.state
    assert result.step == config.train.num_steps and result.metrics["finite"]

    # only adapters are trainable: every params / EMA leaf is a lora_A or lora_B
    for tree in (state.params, state.ema_params):
        paths = traverse_util.flatten_dict(tree)
        assert paths and all(p[-1] in ("lora_A", "lora_B") for p in paths), list(paths)[:3]
    assert set(state.params) == {"unet", "text_encoder"}

    before = _fixed_batch_loss(task, task.init_params(), config)
    after = _fixed_batch_loss(task, jax.tree.map(np.asarray, state.params), config)
    log.info("fixed-batch loss %.4f -> %.4f", before, after)
    assert after < 0.97 * before, (before, after)

    # the frozen base is the built base, bit for bit; merging the trained adapters changes only target kernels
    bases = {"unet": built.params["unet"], "text_encoder": built.frozen["text_encoder"]}
    for part, base in bases.items():
        flat_base = traverse_util.flatten_dict(base)
        frozen = traverse_util.flatten_dict(task.frozen[BASE][part])
        assert all(np.array_equal(frozen[k], flat_base[k]) for k in flat_base)
        merged = traverse_util.flatten_dict(adapters.apply_lora(base, state.params[part], 1.0, 1.0))
        changed = {".".join(k[:-1]) for k in flat_base if not np.array_equal(np.asarray(merged[k]), flat_base[k])}
        assert changed == set(adapters.adapter_modules(state.params[part])), (part, changed)

    # optimizer state and EMA are adapter-sized
    tx = make_optimizer(OptimizerConfig.from_mapping(config.optim))
    full = abstract_train_state(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, np.float32), built.params), tx)
    lora_bytes, full_bytes = adapters.num_bytes(state.opt_state), adapters.num_bytes(full.opt_state)
    print(f"\noptimizer state: LoRA {lora_bytes:,} bytes vs full fine-tune {full_bytes:,} bytes "
          f"({full_bytes / lora_bytes:.0f}x)")
    assert lora_bytes * 10 < full_bytes   # (the flat vectors are padded to 4096 floats: the tiny LoRA is 2 of them)
    assert adapters.num_bytes(state.ema_params) == adapters.num_bytes(state.params)


def test_checkpoint_and_export_hold_adapters(run, tmp_path):
    from flax import traverse_util

    from ip2p_jax.train.export import export_run, read_ema
    from ip2p_jax.train.lora import lora_task
    from ip2p_jax.weights.lora import LORA_FILE, read_lora

    config, workdir, result = run
    task = lora_task(config)
    ema, step = read_ema(workdir, task.abstract_params)   # the checkpoint's params are the adapters
    assert step == config.train.num_steps
    want = traverse_util.flatten_dict(result.state.ema_params)
    assert traverse_util.flatten_dict(ema).keys() == want.keys()

    at_end = read_lora(os.path.join(workdir, "export"))
    out = export_run(workdir, str(tmp_path / "again"))
    again = read_lora(out)
    assert os.listdir(out) and LORA_FILE in os.listdir(out)
    for lf in (at_end, again):
        assert set(lf.adapters) == {"unet", "text_encoder"}
        assert set(v for f in lf.factors.values() for v in f.values()) == {1.0}   # alpha = rank = 4
        got = traverse_util.flatten_dict(lf.adapters)
        for k, v in want.items():
            np.testing.assert_array_equal(got[k], np.asarray(v))


# ------------------------------------------------------------------ pmap and FSDP (subprocess, 4 devices)

def worker(out_path: str, tok: str) -> None:
    import jax
    from jax.sharding import AxisType, Mesh

    from ip2p_jax.train import parallel, state as st
    from ip2p_jax.train.data import make_train_data, model_inputs
    from ip2p_jax.train.lora import BASE, lora_task

    config = lora_config(tok, optim__eps=1e-6, lora__dropout=0.1)
    task = lora_task(config)
    ocfg = st.OptimizerConfig.from_mapping(config.optim)
    tx, sched = st.make_optimizer(ocfg), st.learning_rate_schedule(ocfg)
    data = make_train_data(config, task.tokenizer)
    batches = [model_inputs(next(data)) for _ in range(3)]
    one = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    runners = {
        "one": parallel.MeshRunner(task.models, task.step_config, tx, sched, one, 0, loss_fn=task.loss_fn),
        "pmap": parallel.PmapRunner(task.models, task.step_config, tx, sched, loss_fn=task.loss_fn),
        "fsdp": parallel.MeshRunner(task.models, task.step_config, tx, sched, parallel.make_mesh(2, 2), 0,
                                    loss_fn=task.loss_fn),
    }
    states, out = {}, {"losses": {}}
    for name, runner in runners.items():
        state = runner.init_state(task.init_params(), config.seed)
        frozen = runner.put_frozen(task.frozen)
        if name == "fsdp":
            out["base_sharded"] = sum(not x.is_fully_replicated for x in jax.tree.leaves(frozen[BASE]))
        losses = []
        for b in batches:
            state, m = runner.step(state, frozen, runner.put_batch(b))
            losses.append(runner.scalars(m)["loss"])
        states[name], out["losses"][name] = parallel.fetch(runner.to_global(state)), losses
    ref = states["one"]

    def diff(a, b):
        return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a),
                                                                                       jax.tree.leaves(b)))
    out["max_abs_diff"] = {n: {f: diff(getattr(ref, f), getattr(s, f)) for f in ("params", "ema_params", "opt_state")}
                           for n, s in states.items() if n != "one"}
    out["param_change"] = diff(ref.params, task.init_params())
    with open(out_path, "w") as f:
        json.dump(out, f)


def _compute(folder: str) -> dict:
    out = os.path.join(folder, "out.json")
    return worker_result(__file__, [out, tokenizer_dir(folder)], out, devices=4)


@pytest.mark.parametrize("name", ["pmap", "fsdp"])
def test_lora_step_same_on_four_devices(tmp_path_factory, name):
    result = run_once(tmp_path_factory, "lora_parallel", _compute)
    assert result["param_change"] > 100 * ATOL
    assert result["base_sharded"] > 0                 # the frozen base is sharded over fsdp, not replicated
    for field, d in result["max_abs_diff"][name].items():
        assert d <= ATOL, (name, field, d)
    np.testing.assert_allclose(result["losses"][name], result["losses"]["one"], rtol=1e-5)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    worker(sys.argv[1], sys.argv[2])
