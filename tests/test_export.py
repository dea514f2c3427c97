"""Exported programs: the whole edit (reloaded from bytes, equal to edit()) and one train step;
exports for TPU from this CPU host carry the Pallas attention kernel."""
from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import edit_fixtures as fx
from ip2p_jax.models.unet import UNet2DConditionModel
from ip2p_jax import placement
from ip2p_jax.pipeline import EditPipeline, export_plan
from ip2p_jax.train import state as st
from ip2p_jax.train import step as sp
from ip2p_jax.train.export_step import export_train_step, out_tree
from ip2p_jax.weights import load

pytest.importorskip("flatbuffers", reason="jax.export serialisation needs flatbuffers (pyproject: add it)")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    return load(fx.tiny_model_dir(tmp_path_factory), dtype=np.float32)


def test_exported_edit_reloaded_from_bytes_runs_the_edit(components, monkeypatch):
    """In process (the tests' unoptimised XLA): the reloaded artifact equals the same program
    jitted here bit for bit, and edit() to float rounding (another compile of it at opt level 0)."""
    monkeypatch.setattr(placement, "_COMPILED", {})
    pipe = EditPipeline(components, dtype="fp32")
    fed, real = [], pipe._edit_jit
    monkeypatch.setattr(pipe, "_edit_jit", lambda *a: fed.append(a) or real(*a))
    want = np.stack(pipe.edit(fx.sample_images(2), fx.INSTRUCTION, steps=fx.STEPS, seed=3, resize="keep",
                              batch_size=fx.BATCH, progress=False).arrays)
    params, plan, *inputs = fed[0]
    exported = pipe.export(platform="cpu", batch=fx.BATCH, size=(fx.H, fx.W), steps=fx.STEPS)
    reloaded = jax.export.deserialize(exported.serialize())
    got = np.asarray(reloaded.call(params, export_plan(plan), *inputs))
    same_program = jax.jit(lambda p, pl, *r: real(p, plan.replace(**pl), *r))(params, export_plan(plan), *inputs)
    np.testing.assert_array_equal(got, np.asarray(same_program))
    np.testing.assert_allclose(got[:2], want, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_exported_edit_reloaded_from_bytes_equals_edit(tmp_path_factory):
    env = dict(os.environ, XLA_FLAGS="", PYTHONPATH=os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, os.path.join(HERE, "export_edit_check.py"), fx.tiny_model_dir(tmp_path_factory)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    same, other = (float(v) for v in out.stdout.split("RESULT")[-1].split())
    assert same == 0.0                 # bit for bit
    assert other > 1e-3                # negative control: the plan argument drives it (ddim instead)


def test_export_edit_for_tpu_contains_the_pallas_kernel(components):
    pipe = EditPipeline(components, dtype="bf16", attention_impl="pallas")
    exported = pipe.export(platform="tpu", batch=fx.BATCH, size=(fx.H, fx.W), steps=2)
    assert exported.platforms == ("tpu",)
    assert "tpu_custom_call" in exported.mlir_module()
    assert len(jax.export.deserialize(exported.serialize()).in_avals) == len(exported.in_avals)


def tiny_train_step(components, attention_impl):
    c = components
    unet = UNet2DConditionModel(c.unet_config, dtype=jnp.float32, attention_impl=attention_impl)
    opt = st.OptimizerConfig()
    tx = st.make_optimizer(opt)
    step_fn = sp.make_train_step(sp.Models(unet=unet), sp.StepConfig(), tx, st.learning_rate_schedule(opt))
    state = st.abstract_train_state({"unet": jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32),
                                                          c.unet_params)}, tx)
    b, h, w, ch = 2, 8, 8, c.vae_config.latent_channels
    sds = jax.ShapeDtypeStruct
    text = (77, c.text_config.hidden_size)
    frozen = {"null_embedding": sds(text, jnp.float32), "alphas_cumprod": sds((1000,), jnp.float32)}
    batch = {"input_moments": sds((b, h, w, 2 * ch), jnp.float32), "edited_moments": sds((b, h, w, 2 * ch), jnp.float32),
             "text_embedding": sds((b,) + text, jnp.float32), "example_id": sds((b,), jnp.int32)}
    return step_fn, state, frozen, batch


def test_export_train_step_for_tpu_contains_the_pallas_kernel(components):
    step_fn, state, frozen, batch = tiny_train_step(components, "pallas")
    exported = export_train_step(step_fn, state, frozen, batch, platform="tpu")
    assert "tpu_custom_call" in exported.mlir_module()
    reloaded = jax.export.deserialize(exported.serialize())
    assert len(reloaded.out_avals) == out_tree(step_fn, state, frozen, batch).num_leaves
