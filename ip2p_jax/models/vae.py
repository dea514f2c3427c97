"""The KL autoencoder of Stable Diffusion (diffusers `AutoencoderKL`) in Flax, NHWC.

Param paths mirror diffusers' state-dict names (see ip2p_jax.weights.naming):
encoder.conv_in, encoder.down_blocks_i.{resnets_j, downsamplers_0.conv},
encoder.mid_block.{resnets_0, attentions_0, resnets_1}, encoder.conv_norm_out, encoder.conv_out,
quant_conv, post_quant_conv, decoder.conv_in, decoder.mid_block, decoder.up_blocks_i.{resnets_j,
upsamplers_0.conv}, decoder.conv_norm_out, decoder.conv_out.

`encode` returns the posterior's (mean, logvar); InstructPix2Pix conditions on the mode (the
mean), unscaled; the diffusion latents are `scaling_factor *` a sample. Outputs are float32
whatever the compute dtype. diffusers' `force_upcast` is a pipeline setting (run the VAE in
fp32 when the pipeline is fp16); it is carried in the config for the pipeline to read.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from ip2p_jax.models import config as config_lib
from ip2p_jax.models.config import ConfigError
from ip2p_jax.models.layers import (Downsample2D, ResnetBlock2D, Upsample2D, activation, attention, conv,
                                    group_norm)

EPS = 1e-6  # diffusers hard-codes the VAE's GroupNorm eps
LOGVAR_RANGE = (-30.0, 20.0)  # DiagonalGaussianDistribution clamps logvar to this range


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """diffusers AutoencoderKL config.json; field names and defaults are diffusers' own."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: Any = 32
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None
    latents_mean: Optional[tuple[float, ...]] = None
    latents_std: Optional[tuple[float, ...]] = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        n = len(self.block_out_channels)
        problems = []
        if any(t != "DownEncoderBlock2D" for t in self.down_block_types):
            problems.append(f"down_block_types={list(self.down_block_types)} (only DownEncoderBlock2D)")
        if any(t != "UpDecoderBlock2D" for t in self.up_block_types):
            problems.append(f"up_block_types={list(self.up_block_types)} (only UpDecoderBlock2D)")
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            problems.append(f"{len(self.down_block_types)} down / {len(self.up_block_types)} up block types "
                            f"for {n} block_out_channels")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            problems.append(f"block_out_channels={list(self.block_out_channels)} not divisible by "
                            f"norm_num_groups={self.norm_num_groups}")
        try:
            activation(self.act_fn)
        except ValueError as e:
            problems.append(str(e))
        if problems:
            raise ConfigError("VAEConfig: unsupported " + "; ".join(problems))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "vae config") -> "VAEConfig":
        try:
            return config_lib.from_dict(cls, d, source=source)
        except ConfigError as e:
            msg = str(e)
            raise ConfigError(msg if msg.startswith(source) else f"{source}: {msg}") from None

    def to_dict(self) -> dict:
        """diffusers config.json dict (`AutoencoderKL.from_config` accepts it)."""
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}
        return {"_class_name": "AutoencoderKL", **d}


class VAEAttention(nn.Module):
    """The VAE mid-block attention: GroupNorm, one head over all channels, residual."""

    groups: int
    dtype: Any = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        t = group_norm(self.groups, EPS, self.dtype, "group_norm")(x).reshape(b, h * w, 1, c)
        q, k, v = (nn.Dense(c, dtype=self.dtype, name=n)(t) for n in ("to_q", "to_k", "to_v"))
        o = attention(q, k, v, impl=self.attention_impl, upcast=True).reshape(b, h * w, c)
        o = nn.Dense(c, dtype=self.dtype, name="to_out_0")(o)
        return x + o.reshape(b, h, w, c)


class MidBlock(nn.Module):
    """diffusers UNetMidBlock2D without time embedding: resnet, [attention], resnet."""

    channels: int
    groups: int
    act_fn: str
    add_attention: bool = True
    dtype: Any = jnp.float32
    attention_impl: str = "auto"

    def _resnet(self, name):
        return ResnetBlock2D(self.channels, self.groups, EPS, temb=False, act_fn=self.act_fn, dtype=self.dtype,
                             name=name)

    @nn.compact
    def __call__(self, x):
        x = self._resnet("resnets_0")(x)
        if self.add_attention:
            x = VAEAttention(self.groups, self.dtype, self.attention_impl, name="attentions_0")(x)
        return self._resnet("resnets_1")(x)


class DownEncoderBlock2D(nn.Module):
    out_channels: int
    num_layers: int
    groups: int
    act_fn: str
    add_downsample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, EPS, temb=False, act_fn=self.act_fn,
                              dtype=self.dtype, name=f"resnets_{j}")(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, padding=0, dtype=self.dtype, name="downsamplers_0")(x)
        return x


class UpDecoderBlock2D(nn.Module):
    out_channels: int
    num_layers: int
    groups: int
    act_fn: str
    add_upsample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, EPS, temb=False, act_fn=self.act_fn,
                              dtype=self.dtype, name=f"resnets_{j}")(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    config: VAEConfig
    dtype: Any = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        cfg, dt = self.config, self.dtype
        chans = cfg.block_out_channels
        x = conv(chans[0], 3, dt, "conv_in")(x)
        for i, ch in enumerate(chans):
            x = DownEncoderBlock2D(ch, cfg.layers_per_block, cfg.norm_num_groups, cfg.act_fn,
                                   add_downsample=i < len(chans) - 1, dtype=dt, name=f"down_blocks_{i}")(x)
        x = MidBlock(chans[-1], cfg.norm_num_groups, cfg.act_fn, cfg.mid_block_add_attention, dt,
                     self.attention_impl, name="mid_block")(x)
        x = activation(cfg.act_fn)(group_norm(cfg.norm_num_groups, EPS, dt, "conv_norm_out")(x))
        return conv(2 * cfg.latent_channels, 3, dt, "conv_out")(x)


class Decoder(nn.Module):
    config: VAEConfig
    dtype: Any = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, z):
        cfg, dt = self.config, self.dtype
        chans = tuple(reversed(cfg.block_out_channels))
        x = conv(chans[0], 3, dt, "conv_in")(z)
        x = MidBlock(chans[0], cfg.norm_num_groups, cfg.act_fn, cfg.mid_block_add_attention, dt,
                     self.attention_impl, name="mid_block")(x)
        for i, ch in enumerate(chans):
            x = UpDecoderBlock2D(ch, cfg.layers_per_block + 1, cfg.norm_num_groups, cfg.act_fn,
                                 add_upsample=i < len(chans) - 1, dtype=dt, name=f"up_blocks_{i}")(x)
        x = activation(cfg.act_fn)(group_norm(cfg.norm_num_groups, EPS, dt, "conv_norm_out")(x))
        return conv(cfg.out_channels, 3, dt, "conv_out")(x)


class AutoencoderKL(nn.Module):
    """diffusers AutoencoderKL. Images NHWC in [-1, 1]; latents NHWC with `latent_channels`."""

    config: VAEConfig
    dtype: Any = jnp.float32
    attention_impl: str = "auto"

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg, self.dtype, self.attention_impl)
        self.decoder = Decoder(cfg, self.dtype, self.attention_impl)
        if cfg.use_quant_conv:
            self.quant_conv = nn.Conv(2 * cfg.latent_channels, (1, 1), dtype=self.dtype)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = nn.Conv(cfg.latent_channels, (1, 1), dtype=self.dtype)

    def encode(self, x):
        """x (B, H, W, in_channels) in [-1, 1] -> (mean, logvar), each (B, H/f, W/f, latent_channels), fp32."""
        moments = self.encoder(x)
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        moments = moments.astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z):
        """z (B, h, w, latent_channels), unscaled latents -> image (B, h*f, w*f, out_channels), fp32."""
        z = z.astype(self.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x):
        """Encode then decode the posterior mode (touches every parameter; used for init)."""
        mean, _ = self.encode(x)
        return self.decode(mean)


def posterior_mode(mean, logvar):
    """The mode of the diagonal Gaussian posterior (its mean)."""
    del logvar
    return mean


def posterior_sample(mean, logvar, key):
    """mean + exp(logvar / 2) * standard normal noise."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


def abstract_params(config: VAEConfig, dtype=jnp.float32):
    """The params pytree as jax.ShapeDtypeStruct leaves (no memory, no compute)."""
    side = max(8, 2 ** (len(config.block_out_channels) - 1))
    x = jax.ShapeDtypeStruct((1, side, side, config.in_channels), jnp.float32)
    model = AutoencoderKL(config, dtype)
    return jax.eval_shape(lambda k, x: model.init(k, x)["params"], jax.random.key(0), x)
