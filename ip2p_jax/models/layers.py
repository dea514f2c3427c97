"""Building blocks shared by the UNet and the VAE, and the one attention function.

Layout is NHWC everywhere. Submodule names mirror diffusers' PyTorch names so that
parameter conversion is a table of renames (see ip2p_jax.weights.naming).
"""
from __future__ import annotations

import math
from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from ip2p_jax.models import pallas_attention

ATTENTION_IMPLS = ("auto", "xla", "cudnn", "pallas")
CUDNN_MULTIPLE = 8   # cuDNN attention lengths are padded to this (the true lengths passed along)


def _cudnn_ok(q: jax.Array, return_probs: bool, probs_source) -> bool:
    head_dim = q.shape[-1]
    return (
        not return_probs
        and probs_source is None
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and head_dim % 8 == 0
        and head_dim <= 256
        and jax.default_backend() == "gpu"
    )


def auto_impl(q: jax.Array, return_probs: bool = False, probs_source=None) -> str:
    """What impl="auto" runs: the Pallas kernel on TPU, cuDNN on GPU where it applies, else XLA.
    Decided by the default backend at trace time: to produce a TPU program on another host, force
    impl="pallas" (the models' attention_impl)."""
    if return_probs or probs_source is not None:
        return "xla"
    if jax.default_backend() == "tpu":
        return "pallas"
    return "cudnn" if _cudnn_ok(q, return_probs, probs_source) else "xla"


def padded_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: str = "cudnn",
                     causal: bool = False, multiple: int = CUDNN_MULTIPLE) -> jax.Array:
    """jax.nn.dot_product_attention with q and k/v lengths zero-padded to `multiple` and the true
    lengths passed, so padded keys get no weight and padded queries are cut off: exact. cuDNN
    needs this for odd lengths (77 CLIP tokens); implementation="xla" runs the same path anywhere."""
    batch, q_len, kv_len = q.shape[0], q.shape[1], k.shape[1]
    lq, lk = -(-q_len // multiple) * multiple, -(-kv_len // multiple) * multiple
    if (lq, lk) == (q_len, kv_len):
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation)
    pad = lambda t, n: jnp.pad(t, ((0, 0), (0, n - t.shape[1]), (0, 0), (0, 0)))  # noqa: E731
    lengths = lambda n: jnp.full((batch,), n, jnp.int32)  # noqa: E731
    out = jax.nn.dot_product_attention(pad(q, lq), pad(k, lk), pad(v, lk), is_causal=causal,
                                       query_seq_lengths=lengths(q_len), key_value_seq_lengths=lengths(kv_len),
                                       implementation=implementation)
    return out[:, :q_len]


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    impl: str = "auto",
    causal: bool = False,
    upcast: bool = False,
    return_probs: bool = False,
    probs_source: Optional[jax.Array] = None,
):
    """Scaled dot-product attention on (batch, length, heads, head_dim) arrays.

    impl: "xla" (einsum + softmax; exact in fp32; the only one that can return or replace
    probabilities), "cudnn" (fused kernel, GPU, bf16/fp16; lengths padded to 8 with the true
    lengths passed), "pallas" (the Pallas TPU splash kernel, see models.pallas_attention; scores
    always fp32), or "auto" (see auto_impl).
    upcast: compute scores and softmax in fp32 (diffusers' `upcast_attention`).
    probs_source: optional int (batch,) index; row b uses the attention probabilities
    of row probs_source[b] (prompt-to-prompt's self-attention injection).
    Returns out (batch, length, heads, head_dim), and the probabilities
    (batch, heads, q_len, k_len) too when return_probs.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = auto_impl(q, return_probs, probs_source)
    if impl != "xla" and (return_probs or probs_source is not None):
        raise ValueError(f"{impl} attention cannot return or replace probabilities; use impl='xla'")
    if impl == "cudnn":
        return padded_attention(q, k, v, causal=causal)
    if impl == "pallas":
        return pallas_attention.splash_attention(q, k, v, causal=causal)

    dtype = q.dtype
    scale = 1.0 / math.sqrt(q.shape[-1])
    if upcast:
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(scale, q.dtype), k)
    if causal:
        lq, lk = scores.shape[-2:]
        mask = jnp.tril(jnp.ones((lq, lk), bool))
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
    if probs_source is not None:
        probs = probs[probs_source]
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v).astype(dtype)
    return (out, probs) if return_probs else out


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm on NHWC / (B, L, C): fp32 statistics in one pass over x, params `scale`
    and `bias` (flax.linen.GroupNorm's names), output in `dtype`. One pass: the mean and mean square
    of x minus a per-group shift (the group's first position's mean), so E[d^2] - E[d]^2 does not
    cancel when the mean is large; both reductions read x once."""

    num_groups: int
    epsilon: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        g = x.astype(jnp.float32).reshape(x.shape[0], -1, self.num_groups, c // self.num_groups)
        shift = jax.lax.stop_gradient(jnp.mean(g[:, :1], axis=(1, 3), keepdims=True))
        d = g - shift
        m1 = jnp.mean(d, axis=(1, 3), keepdims=True)
        var = jnp.maximum(jnp.mean(jnp.square(d), axis=(1, 3), keepdims=True) - jnp.square(m1), 0.0)
        y = (d - m1) * jax.lax.rsqrt(var + self.epsilon)
        return (y.reshape(x.shape) * scale + bias).astype(self.dtype)


def group_norm(groups: int, eps: float, dtype, name: str) -> GroupNorm:
    """GroupNorm with fp32 one-pass statistics (as accurate as PyTorch's at the parity tolerances),
    output cast to `dtype`."""
    return GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, name=name)


def conv(features: int, kernel: int, dtype, name: str, stride: int = 1, padding=None) -> nn.Conv:
    pad = ((kernel // 2, kernel // 2),) * 2 if padding is None else padding
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=pad, dtype=dtype, name=name)


def activation(name: str):
    table = {"silu": nn.silu, "swish": nn.silu, "gelu": partial(nn.gelu, approximate=False), "relu": nn.relu}
    if name not in table:
        raise ValueError(f"unsupported act_fn {name!r}; supported: {sorted(table)}")
    return table[name]


class ResnetBlock2D(nn.Module):
    """diffusers ResnetBlock2D (time embedding optional, 'default' norm, no up/down)."""

    out_channels: int
    groups: int = 32
    eps: float = 1e-6
    temb: bool = True
    act_fn: str = "silu"
    output_scale_factor: float = 1.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None):
        act = activation(self.act_fn)
        h = act(group_norm(self.groups, self.eps, self.dtype, "norm1")(x))
        h = conv(self.out_channels, 3, self.dtype, "conv1")(h)
        if self.temb and temb is not None:
            t = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(act(temb))
            h = h + t[:, None, None, :]
        h = act(group_norm(self.groups, self.eps, self.dtype, "norm2")(h))
        h = conv(self.out_channels, 3, self.dtype, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
        return (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. padding=1 (UNet) or the VAE's asymmetric (0,1) pad with padding=0."""

    out_channels: int
    padding: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
            pad = ((0, 0), (0, 0))
        else:
            pad = ((self.padding, self.padding),) * 2
        return conv(self.out_channels, 3, self.dtype, "conv", stride=2, padding=pad)(x)


class Upsample2D(nn.Module):
    """Nearest x2 upsampling (or to an explicit size) followed by a 3x3 conv."""

    out_channels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, size=None):
        b, h, w, c = x.shape
        th, tw = size if size is not None else (2 * h, 2 * w)
        # nearest neighbour as torch F.interpolate(mode="nearest"): src = floor(dst * in / out)
        rows = (jnp.arange(th) * h) // th
        cols = (jnp.arange(tw) * w) // tw
        x = x[:, rows][:, :, cols]
        return conv(self.out_channels, 3, self.dtype, "conv")(x)
