"""Stable Diffusion's UNet (diffusers' UNet2DConditionModel) in Flax Linen, NHWC.

Param paths mirror diffusers' module names (conv_in, time_embedding/linear_1, down_blocks_0/
resnets_0, .../attentions_0/transformer_blocks_0/attn1/to_q, up_blocks_1/upsamplers_0/conv, ...)
so PyTorch weights convert with ip2p_jax.weights.naming.torch_to_flax.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from ip2p_jax.models.config import ConfigError, from_dict
from ip2p_jax.models.layers import (Downsample2D, ResnetBlock2D, Upsample2D, activation, conv,
                                    group_norm)
from ip2p_jax.models.transformer import Transformer2DModel

DOWN_BLOCKS = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}   # type -> has cross-attention
UP_BLOCKS = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", None)
TIME_IDS = 6   # SDXL micro-conditioning: original (h, w), crop top-left (y, x), target (h, w)

# diffusers UNet2DConditionModel arguments we do not implement, accepted at their off / default value.
ACCEPTED_DEFAULTS = {
    "dropout": 0.0, "only_cross_attention": False, "dual_cross_attention": False,
    "class_embed_type": None, "num_class_embeds": None, "class_embeddings_concat": False,
    "addition_embed_type_num_heads": 64,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "reverse_transformer_layers_per_block": None,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "attention_type": "default", "mid_block_only_cross_attention": None, "cross_attention_norm": None,
}


class Stage(NamedTuple):
    """What one down / mid / up block needs to know."""
    out_channels: int
    num_layers: int          # resnets in the block
    attention: bool          # a Transformer2DModel after each resnet
    heads: int
    transformer_layers: int
    resample: bool           # down: stride-2 conv at the end; up: upsampler at the end


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """diffusers' UNet2DConditionModel config.json (field names and defaults as diffusers').

    attention_head_dim is, by diffusers' historical quirk, the number of heads per block unless
    num_attention_heads is given; per-block values may be an int or a tuple (one per down block).
    """
    sample_size: Any = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: Optional[str] = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: Any = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: Any = 1
    attention_head_dim: Any = 8
    num_attention_heads: Any = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    # SDXL: "text_time" adds an embedding of [pooled text (B, P), sinusoids of 6 time ids] to temb
    addition_embed_type: Optional[str] = None
    addition_time_embed_dim: Optional[int] = None
    projection_class_embeddings_input_dim: Optional[int] = None

    def __post_init__(self):
        n = len(self.down_block_types)
        problems = []
        if len(self.up_block_types) != n or len(self.block_out_channels) != n:
            problems.append("down_block_types, up_block_types and block_out_channels differ in length")
        problems += [f"unsupported down block {t!r}" for t in self.down_block_types if t not in DOWN_BLOCKS]
        problems += [f"unsupported up block {t!r}" for t in self.up_block_types if t not in UP_BLOCKS]
        if self.mid_block_type not in MID_BLOCKS:
            problems.append(f"unsupported mid_block_type {self.mid_block_type!r}")
        for name in ("layers_per_block", "transformer_layers_per_block", "attention_head_dim", "num_attention_heads"):
            value = getattr(self, name)
            if isinstance(value, tuple) and (len(value) != n or not all(isinstance(v, int) for v in value)):
                problems.append(f"{name}={value!r} must be an int or {n} ints")
        if not isinstance(self.cross_attention_dim, int):
            problems.append(f"cross_attention_dim={self.cross_attention_dim!r} must be one int")
        if self.norm_num_groups is None:
            problems.append("norm_num_groups=None (no output norm) is not supported")
        if self.addition_embed_type not in (None, "text_time"):
            problems.append(f"unsupported addition_embed_type {self.addition_embed_type!r} (None or 'text_time')")
        elif self.text_time and not all(isinstance(v, int) and v > 0 for v in (
                self.addition_time_embed_dim, self.projection_class_embeddings_input_dim)):
            problems.append("addition_embed_type='text_time' needs integer addition_time_embed_dim and "
                            "projection_class_embeddings_input_dim")
        try:
            activation(self.act_fn)
        except ValueError as e:
            problems.append(str(e))
        if problems:
            raise ConfigError("UNetConfig: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "unet config") -> "UNetConfig":
        """From a diffusers unet/config.json dict; ConfigError names unsupported keys or values."""
        try:
            return from_dict(cls, d, source=source, accepted_defaults=ACCEPTED_DEFAULTS)
        except ConfigError as e:
            raise ConfigError(str(e) if str(e).startswith(source) else f"{source}: {e}") from None

    def to_dict(self) -> dict:
        """A config.json dict that diffusers' UNet2DConditionModel.from_config accepts."""
        d = {"_class_name": "UNet2DConditionModel"}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            d[f.name] = list(value) if isinstance(value, tuple) else value
        return d

    @property
    def text_time(self) -> bool:
        """SDXL's micro-conditioning: the UNet also takes pooled text embeds and 6 time ids."""
        return self.addition_embed_type == "text_time"

    @property
    def pooled_dim(self) -> int:
        """The pooled text embedding size a text_time UNet expects (its add_embedding input minus
        the six time-id sinusoids)."""
        return self.projection_class_embeddings_input_dim - TIME_IDS * self.addition_time_embed_dim

    def _per_block(self, value) -> tuple:
        return tuple(value) if isinstance(value, tuple) else (value,) * len(self.down_block_types)

    def _heads(self) -> tuple:
        return self._per_block(self.attention_head_dim if self.num_attention_heads is None
                               else self.num_attention_heads)

    def down_stages(self) -> list[Stage]:
        layers, heads = self._per_block(self.layers_per_block), self._heads()
        tlayers, n = self._per_block(self.transformer_layers_per_block), len(self.down_block_types)
        return [Stage(self.block_out_channels[i], layers[i], DOWN_BLOCKS[t], heads[i], tlayers[i], i < n - 1)
                for i, t in enumerate(self.down_block_types)]

    def mid_stage(self) -> Stage:
        heads, tlayers = self._heads(), self._per_block(self.transformer_layers_per_block)
        return Stage(self.block_out_channels[-1], 1, True, heads[-1], tlayers[-1], False)

    def up_stages(self) -> list[Stage]:
        rev = lambda values: tuple(reversed(values))  # noqa: E731
        layers, heads = rev(self._per_block(self.layers_per_block)), rev(self._heads())
        tlayers, chans = rev(self._per_block(self.transformer_layers_per_block)), rev(self.block_out_channels)
        n = len(self.up_block_types)
        return [Stage(chans[i], layers[i] + 1, UP_BLOCKS[t], heads[i], tlayers[i], i < n - 1)
                for i, t in enumerate(self.up_block_types)]


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> jax.Array:
    """diffusers' get_timestep_embedding: (B,) -> (B, dim) fp32 sinusoids, frequencies 10000^(-i/(half-shift))."""
    half = dim // 2
    exponent = -math.log(10000.0) * np.arange(half, dtype=np.float32) / np.float32(half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(jnp.asarray(exponent, jnp.float32))[None, :]
    parts = [jnp.cos(args), jnp.sin(args)] if flip_sin_to_cos else [jnp.sin(args), jnp.cos(args)]
    emb = jnp.concatenate(parts, axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class TimestepEmbedding(nn.Module):
    features: int
    act_fn: str = "silu"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = activation(self.act_fn)(nn.Dense(self.features, dtype=self.dtype, name="linear_1")(x))
        return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(x)


def _time_mlp(config: UNetConfig, dtype, name: str | None = None) -> TimestepEmbedding:
    return TimestepEmbedding(4 * config.block_out_channels[0], config.act_fn, dtype, name=name)


def _time_sinusoids(config: UNetConfig, timesteps: jax.Array, dtype) -> jax.Array:
    return timestep_embedding(timesteps, config.block_out_channels[0], config.flip_sin_to_cos,
                              config.freq_shift).astype(dtype)


def step_embeddings(unet: "UNet2DConditionModel", params: dict, timesteps: jax.Array) -> jax.Array:
    """The UNet's time embedding of each of `timesteps` (n,) -> (n, 4 * block_out_channels[0]): what
    __call__ computes first from its timesteps, done once for every sampler step (the edit passes
    row i as `temb=`, so the loop body does not rerun the sinusoids and the MLP)."""
    c = unet.config
    return _time_mlp(c, unet.dtype).apply({"params": params["time_embedding"]},
                                          _time_sinusoids(c, jnp.asarray(timesteps), unet.dtype))


class _Block(nn.Module):
    """Shared settings of the UNet's blocks; subclasses build diffusers' block layouts."""
    stage: Stage
    config: UNetConfig
    attention_impl: str = "auto"
    dtype: jnp.dtype = jnp.float32

    def resnet(self, name: str, scale: float = 1.0) -> ResnetBlock2D:
        c = self.config
        return ResnetBlock2D(self.stage.out_channels, c.norm_num_groups, c.norm_eps, act_fn=c.act_fn,
                             output_scale_factor=scale, dtype=self.dtype, name=name)

    def transformer(self, name: str) -> Transformer2DModel:
        s, c = self.stage, self.config
        return Transformer2DModel(s.heads, s.out_channels // s.heads, s.transformer_layers, c.norm_num_groups,
                                  c.use_linear_projection, c.upcast_attention, self.attention_impl,
                                  dtype=self.dtype, name=name)


class DownBlock(_Block):
    """CrossAttnDownBlock2D / DownBlock2D. Returns (x, skips): one skip per layer, one after downsampling."""

    @nn.compact
    def __call__(self, x, temb, context, self_attn_source=None):
        skips = []
        for j in range(self.stage.num_layers):
            x = self.resnet(f"resnets_{j}")(x, temb)
            if self.stage.attention:
                x = self.transformer(f"attentions_{j}")(x, context, self_attn_source)
            skips.append(x)
        if self.stage.resample:
            x = Downsample2D(self.stage.out_channels, self.config.downsample_padding, self.dtype,
                             name="downsamplers_0")(x)
            skips.append(x)
        return x, tuple(skips)


class MidBlock(_Block):
    """UNetMidBlock2DCrossAttn: resnet, then (transformer, resnet) per layer; resnets scaled by
    mid_block_scale_factor."""

    @nn.compact
    def __call__(self, x, temb, context, self_attn_source=None):
        scale = self.config.mid_block_scale_factor
        x = self.resnet("resnets_0", scale)(x, temb)
        for j in range(self.stage.num_layers):
            x = self.transformer(f"attentions_{j}")(x, context, self_attn_source)
            x = self.resnet(f"resnets_{j + 1}", scale)(x, temb)
        return x


class UpBlock(_Block):
    """CrossAttnUpBlock2D / UpBlock2D: each layer concatenates the last skip (channels last), then
    upsamples to `upsample_size` (the matching down level's size, so odd sizes round-trip)."""
    upsample_size: Optional[tuple[int, int]] = None

    @nn.compact
    def __call__(self, x, skips, temb, context, self_attn_source=None):
        for j in range(self.stage.num_layers):
            x = jnp.concatenate([x, skips[-1 - j]], axis=-1)
            x = self.resnet(f"resnets_{j}")(x, temb)
            if self.stage.attention:
                x = self.transformer(f"attentions_{j}")(x, context, self_attn_source)
        if self.stage.resample:
            x = Upsample2D(self.stage.out_channels, self.dtype, name="upsamplers_0")(x, self.upsample_size)
        return x


REMAT_POLICIES = ("none", "dots", "full")


def remat_policy(value) -> str:
    """A remat setting (bool or one of REMAT_POLICIES, any case) as its policy name."""
    name = {True: "full", False: "none"}.get(value, value) if isinstance(value, bool) else str(value).lower()
    name = {"true": "full", "false": "none", "": "none"}.get(name, name)
    if name not in REMAT_POLICIES:
        raise ConfigError(f"remat={value!r}: one of {', '.join(REMAT_POLICIES)} (or true / false)")
    return name


def remat_wrapper(value):
    name = remat_policy(value)
    if name == "none":
        return lambda cls: cls
    if name == "dots":
        return lambda cls: nn.remat(cls, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    return nn.remat


class UNet2DConditionModel(nn.Module):
    """Noise prediction eps(sample, t, text). NHWC sample (B, h, w, in_channels), timesteps (B,) or
    scalar, encoder_hidden_states (B, L, cross_attention_dim) -> (B, h, w, out_channels) in `dtype`.

    temb: optional precomputed time embedding (B or 1, 4 * block_out_channels[0]) from step_embeddings,
    used instead of embedding `timesteps` (the SDXL text_time embedding is still added).
    self_attn_source: optional int (B,); row b takes every self-attention's probabilities from row
    self_attn_source[b] (prompt-to-prompt injection; needs the "xla" attention path).
    remat: what each block keeps for the backward pass (REMAT_POLICIES): "none" (everything),
    "dots" (the matmul outputs without batch dimensions - the projections, not the attention scores -
    the rest recomputed), "full" (nothing: the whole block recomputed). False / True mean none / full.
    """
    config: UNetConfig
    dtype: jnp.dtype = jnp.float32
    attention_impl: str = "auto"
    remat: bool | str = False

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, self_attn_source=None, text_embeds=None,
                 time_ids=None, temb=None):
        c, dtype = self.config, self.dtype
        wrap = remat_wrapper(self.remat)
        common = dict(config=c, attention_impl=self.attention_impl, dtype=dtype)
        if self_attn_source is not None:
            self_attn_source = jnp.asarray(self_attn_source, jnp.int32)

        x = sample.astype(dtype)
        if c.center_input_sample:
            x = 2 * x - 1.0
        if temb is None:
            t = jnp.broadcast_to(jnp.asarray(timesteps), (x.shape[0],))
            temb = _time_mlp(c, dtype, "time_embedding")(_time_sinusoids(c, t, dtype))
        else:   # precomputed (step_embeddings); one row serves the whole batch
            temb = jnp.broadcast_to(jnp.asarray(temb, dtype), (x.shape[0], temb.shape[-1]))
        if c.text_time:
            temb = temb + self._added_embedding(text_embeds, time_ids, x.shape[0])
        context = encoder_hidden_states.astype(dtype)

        x = conv(c.block_out_channels[0], 3, dtype, "conv_in")(x)
        skips = [x]
        for i, stage in enumerate(c.down_stages()):
            x, res = wrap(DownBlock)(stage, **common, name=f"down_blocks_{i}")(x, temb, context, self_attn_source)
            skips += res
        if c.mid_block_type is not None:
            x = wrap(MidBlock)(c.mid_stage(), **common, name="mid_block")(x, temb, context, self_attn_source)
        for i, stage in enumerate(c.up_stages()):
            res, skips = tuple(skips[-stage.num_layers:]), skips[:-stage.num_layers]
            size = tuple(skips[-1].shape[1:3]) if stage.resample else None
            x = wrap(UpBlock)(stage, **common, upsample_size=size, name=f"up_blocks_{i}")(
                x, res, temb, context, self_attn_source)

        x = activation(c.act_fn)(group_norm(c.norm_num_groups, c.norm_eps, dtype, "conv_norm_out")(x))
        return conv(c.out_channels, 3, dtype, "conv_out")(x)

    def _added_embedding(self, text_embeds, time_ids, batch: int):
        """diffusers' text_time: add_embedding(concat(pooled text, add_time_proj(time ids)))."""
        c = self.config
        if text_embeds is None or time_ids is None:
            raise ConfigError("UNet2DConditionModel: addition_embed_type='text_time' needs text_embeds (B, "
                              f"{c.pooled_dim}) and time_ids (B, {TIME_IDS})")
        if text_embeds.shape != (batch, c.pooled_dim) or time_ids.shape != (batch, TIME_IDS):
            raise ConfigError(f"UNet2DConditionModel: text_embeds {text_embeds.shape} / time_ids {time_ids.shape}; "
                              f"expected ({batch}, {c.pooled_dim}) / ({batch}, {TIME_IDS})")
        times = timestep_embedding(jnp.reshape(time_ids, (-1,)), c.addition_time_embed_dim, c.flip_sin_to_cos,
                                   c.freq_shift).reshape(batch, -1)
        added = jnp.concatenate([text_embeds.astype(jnp.float32), times], axis=-1).astype(self.dtype)
        return _time_mlp(c, self.dtype, "add_embedding")(added)


def abstract_params(config: UNetConfig) -> dict:
    """The fp32 param pytree's shapes (jax.ShapeDtypeStruct leaves), without allocating memory."""
    n = 2 ** (len(config.block_out_channels) - 1)
    sample = jax.ShapeDtypeStruct((1, n, n, config.in_channels), jnp.float32)
    context = jax.ShapeDtypeStruct((1, 1, config.cross_attention_dim), jnp.float32)
    model = UNet2DConditionModel(config)
    extra = {}
    if config.text_time:
        extra = {"text_embeds": jnp.zeros((1, config.pooled_dim)), "time_ids": jnp.zeros((1, TIME_IDS))}
    return jax.eval_shape(lambda s, c: model.init(jax.random.key(0), s, jnp.zeros((1,)), c, **extra)["params"],
                          sample, context)
