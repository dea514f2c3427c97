"""Fewer guidance branches where the scales make them exact: equal to the 3-way result."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import edit_fixtures as fx
from ip2p_jax import placement
from ip2p_jax.diffusion import guidance as G
from ip2p_jax.pipeline import EditPipeline
from ip2p_jax.weights import load


def fake_model(x, t, text, i):
    """Any per-row function of (latents, timestep, text) stands in for the UNet."""
    return jnp.tanh(x[..., :4] * 1.3 + x[..., 4:] * 0.7) + jnp.mean(text, axis=(1, 2))[:, None, None, None] + t[:, None, None, None] * 1e-3


@pytest.mark.parametrize("s_t,s_i,want", [(7.5, 1.0, ("cond", "image")), (1.0, 1.0, ("cond",)),
                                          (0.0, 1.5, ("image", "uncond")), (1.0, 1.5, G.FULL), (7.5, 1.5, G.FULL)])
def test_reduced_branches_equal_three_way(s_t, s_i, want):
    assert G.branches_for(s_t, s_i) == want
    r = np.random.default_rng(0)
    lat, img = (jnp.asarray(r.standard_normal((3, 4, 5, 4)), jnp.float32) for _ in range(2))
    cond, null = jnp.asarray(r.standard_normal((3, 7, 6)), jnp.float32), jnp.asarray(r.standard_normal((7, 6)), jnp.float32)
    full = G.guided_eps_fn(fake_model, img, cond, null, s_t, s_i)(lat, 500.0, 0)
    reduced = G.guided_eps_fn(fake_model, img, cond, null, s_t, s_i, want)(lat, 500.0, 0)
    np.testing.assert_allclose(np.asarray(reduced), np.asarray(full), rtol=0, atol=1e-5)
    # negative control: the reduction at other scales is wrong by far more than the tolerance
    if want != G.FULL:
        off = G.guided_eps_fn(fake_model, img, cond, null, s_t + 0.5, s_i + 0.5, want)(lat, 500.0, 0)
        full_off = G.guided_eps_fn(fake_model, img, cond, null, s_t + 0.5, s_i + 0.5)(lat, 500.0, 0)
        assert np.max(np.abs(np.asarray(off) - np.asarray(full_off))) > 1e-2


def test_per_example_scales_reduce_only_when_all_allow():
    assert G.branches_for([3.0, 7.5], [1.0, 1.0]) == ("cond", "image")
    assert G.branches_for([3.0, 7.5], [1.0, 1.2]) == G.FULL


def test_pipeline_two_branch_edit_equals_three_way(tmp_path_factory, monkeypatch):
    monkeypatch.setattr(placement, "_COMPILED", {})
    pipe = EditPipeline(load(fx.tiny_model_dir(tmp_path_factory), dtype=np.float32), dtype="fp32")
    kw = dict(steps=fx.STEPS, seed=5, resize="keep", batch_size=fx.BATCH, progress=False, image_scale=1.0)
    two = np.stack(pipe.edit(fx.sample_images(2), fx.INSTRUCTION, **kw).arrays)
    assert any(k[-1] == ("cond", "image") for k in placement._COMPILED)   # the reduced edit ran
    monkeypatch.setattr(G, "branches_for", lambda *a: G.FULL)
    three = np.stack(pipe.edit(fx.sample_images(2), fx.INSTRUCTION, **kw).arrays)
    np.testing.assert_allclose(two, three, rtol=0, atol=1e-5)
    other = np.stack(pipe.edit(fx.sample_images(2), fx.INSTRUCTION, **dict(kw, image_scale=1.3)).arrays)
    assert np.max(np.abs(other - three)) > 1e-3
