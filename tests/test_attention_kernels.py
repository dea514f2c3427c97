"""The attention kernels against the exact XLA path: the Pallas TPU splash kernel (interpret mode on
CPU, forward and gradients, SD's head dims, odd lengths) and the padded cuDNN path (the same
padding + true-length code, run with XLA here)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ip2p_jax.models import layers, pallas_attention

FWD_TOL = 1e-5
GRAD_TOL = 1e-5


def qkv(q_len, kv_len, heads, head_dim, batch=2, seed=0):
    r = np.random.default_rng(seed)
    shapes = [(batch, q_len, heads, head_dim), (batch, kv_len, heads, head_dim), (batch, kv_len, heads, head_dim)]
    return [jnp.asarray(r.standard_normal(s).astype(np.float32)) for s in shapes]


def loss(impl, causal=False):
    # a non-linear read-out so every output element weighs differently in the gradient
    return lambda q, k, v: jnp.sum(jnp.sin(layers.attention(q, k, v, impl=impl, causal=causal)))


@pytest.fixture(autouse=True)
def interpret_mode():
    with pallas_attention.interpret():
        yield


# (q_len, kv_len, heads, head_dim): SD's head dims 40 / 80 / 160, odd lengths, 77 text tokens, and
# one length past a whole block so the multi-block path with padding runs
CASES = [(9, 77, 2, 40), (33, 33, 2, 80), (7, 5, 1, 160), (130, 19, 1, 40)]


@pytest.mark.parametrize("q_len,kv_len,heads,head_dim", CASES)
def test_pallas_equals_xla_forward_and_gradients(q_len, kv_len, heads, head_dim):
    q, k, v = qkv(q_len, kv_len, heads, head_dim)
    want = layers.attention(q, k, v, impl="xla")
    got = jax.jit(lambda q, k, v: layers.attention(q, k, v, impl="pallas"))(q, k, v)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=FWD_TOL)
    g_want = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    g_got = jax.jit(jax.grad(loss("pallas"), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g_got, g_want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=GRAD_TOL)


def test_pallas_causal_equals_xla():
    q, k, v = qkv(11, 11, 2, 40, seed=3)
    want = layers.attention(q, k, v, impl="xla", causal=True)
    got = jax.jit(lambda q, k, v: layers.attention(q, k, v, impl="pallas", causal=True))(q, k, v)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=FWD_TOL)


def test_tolerance_has_teeth():
    """Negative controls: dropping one key, or padding keys without masking them, misses the
    reference by far more than the tolerance."""
    q, k, v = qkv(9, 77, 2, 40, seed=1)
    want = np.asarray(layers.attention(q, k, v, impl="xla"))
    one_less = np.asarray(layers.attention(q, k[:, :-1], v[:, :-1], impl="pallas"))
    assert np.max(np.abs(one_less - want)) > 100 * FWD_TOL
    pad = lambda t: jnp.pad(t, ((0, 0), (0, 3), (0, 0), (0, 0)))  # noqa: E731
    unmasked = np.asarray(layers.attention(q, pad(k), pad(v), impl="xla"))
    assert np.max(np.abs(unmasked - want)) > 100 * FWD_TOL


@pytest.mark.parametrize("q_len,kv_len", [(9, 77), (16, 77), (13, 13), (16, 16)])
def test_padded_cudnn_style_attention_equals_unpadded(q_len, kv_len):
    q, k, v = qkv(q_len, kv_len, 2, 40, seed=2)
    want = layers.attention(q, k, v, impl="xla")
    run = lambda q, k, v: layers.padded_attention(q, k, v, implementation="xla")  # noqa: E731
    np.testing.assert_allclose(np.asarray(jax.jit(run)(q, k, v)), np.asarray(want), rtol=0, atol=FWD_TOL)
    g = jax.grad(lambda q, k, v: jnp.sum(jnp.sin(run(q, k, v))), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g, jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=GRAD_TOL)


def test_auto_choice_and_probabilities():
    q, k, v = qkv(8, 8, 1, 40)
    want = {"tpu": "pallas", "cpu": "xla"}.get(jax.default_backend())
    assert want is None or layers.auto_impl(q) == want
    assert layers.auto_impl(q, return_probs=True) == "xla"
    for impl in ("pallas", "cudnn"):
        with pytest.raises(ValueError, match="cannot return or replace probabilities"):
            layers.attention(q, k, v, impl=impl, return_probs=True)
    with pytest.raises(ValueError, match="impl must be one of"):
        layers.attention(q, k, v, impl="flash")


def test_export_for_tpu_contains_the_kernel():
    """A TPU program from this host: the forced Pallas path lowers to a Mosaic custom call."""
    with pallas_attention.interpret(False):
        q, k, v = (jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in [(2, 64, 2, 40), (2, 77, 2, 40), (2, 77, 2, 40)])
        exp = jax.export.export(jax.jit(lambda q, k, v: layers.attention(q, k, v, impl="pallas")),
                                platforms=["tpu"])(q, k, v)
    assert "tpu_custom_call" in exp.mlir_module()
