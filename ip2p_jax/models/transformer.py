"""diffusers' Transformer2DModel (continuous input, layer-norm blocks) for the SD UNet, NHWC.

Submodule names mirror diffusers: norm, proj_in, transformer_blocks_i/{norm1, attn1, norm2,
attn2, norm3, ff/{net_0/proj, net_2}}, proj_out; attention to_q/to_k/to_v/to_out_0.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from ip2p_jax.models.layers import attention, conv, group_norm


def layer_norm(dtype, name: str) -> nn.LayerNorm:
    """torch.nn.LayerNorm(eps=1e-5): fp32 two-pass statistics, output in `dtype`."""
    return nn.LayerNorm(epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32, use_fast_variance=False, name=name)


class Attention(nn.Module):
    """Multi-head attention; self-attention when `context` is None. No q/k/v bias, to_out_0 with bias."""

    heads: int
    head_dim: int
    upcast: bool = False
    impl: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None, probs_source: Optional[jax.Array] = None):
        context = x if context is None else context
        inner = self.heads * self.head_dim

        def project(name, t):
            t = nn.Dense(inner, use_bias=False, dtype=self.dtype, name=name)(t)
            return t.reshape(t.shape[:-1] + (self.heads, self.head_dim))

        q, k, v = project("to_q", x), project("to_k", context), project("to_v", context)
        out = attention(q, k, v, impl=self.impl, upcast=self.upcast, probs_source=probs_source)
        out = out.reshape(out.shape[:-2] + (inner,))
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="to_out_0")(out)


class GEGLU(nn.Module):
    """proj -> (hidden, gate) halves -> hidden * gelu(gate), exact (erf) gelu as torch."""

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        hidden, gate = jnp.split(nn.Dense(2 * self.features, dtype=self.dtype, name="proj")(x), 2, axis=-1)
        return hidden * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """GEGLU feed-forward with inner width 4 * dim (net_0 = GEGLU, net_1 = dropout, net_2 = Dense)."""

    mult: int = 4
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dim = x.shape[-1]
        h = GEGLU(self.mult * dim, dtype=self.dtype, name="net_0")(x)
        return nn.Dense(dim, dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to `context`, feed-forward; each with a residual."""

    heads: int
    head_dim: int
    upcast_attention: bool = False
    attention_impl: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context, self_attn_source=None):
        attn = dict(heads=self.heads, head_dim=self.head_dim, upcast=self.upcast_attention,
                    impl=self.attention_impl, dtype=self.dtype)
        x = x + Attention(**attn, name="attn1")(layer_norm(self.dtype, "norm1")(x), probs_source=self_attn_source)
        x = x + Attention(**attn, name="attn2")(layer_norm(self.dtype, "norm2")(x), context)
        return x + FeedForward(dtype=self.dtype, name="ff")(layer_norm(self.dtype, "norm3")(x))


class Transformer2DModel(nn.Module):
    """GroupNorm (eps 1e-6) -> proj_in (1x1 conv, or Dense when use_linear_projection) -> blocks
    -> proj_out -> + input. `self_attn_source` goes to every block's attn1 (see layers.attention)."""

    heads: int
    head_dim: int
    num_layers: int = 1
    groups: int = 32
    use_linear_projection: bool = False
    upcast_attention: bool = False
    attention_impl: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context, self_attn_source=None):
        b, h, w, c = x.shape
        inner = self.heads * self.head_dim
        if self.use_linear_projection:
            proj_in = nn.Dense(inner, dtype=self.dtype, name="proj_in")
            proj_out = nn.Dense(c, dtype=self.dtype, name="proj_out")
        else:
            proj_in = conv(inner, 1, self.dtype, "proj_in")
            proj_out = conv(c, 1, self.dtype, "proj_out")

        hidden = proj_in(group_norm(self.groups, 1e-6, self.dtype, "norm")(x)).reshape(b, h * w, inner)
        for i in range(self.num_layers):
            hidden = BasicTransformerBlock(
                self.heads, self.head_dim, self.upcast_attention, self.attention_impl, dtype=self.dtype,
                name=f"transformer_blocks_{i}")(hidden, context, self_attn_source)
        return proj_out(hidden.reshape(b, h, w, inner)) + x
