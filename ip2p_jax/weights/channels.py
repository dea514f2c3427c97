"""Widening the UNet's first convolution: Stable Diffusion (4 input channels) -> InstructPix2Pix (8)."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from ip2p_jax.weights.naming import WeightsError


def expand_conv_in(unet_params: dict, unet_config, new_in_channels: int = 8):
    """(params, config) of a UNet whose conv_in takes `new_in_channels`: the pretrained input channels'
    kernels and the bias are kept, the extra channels' kernels are zero, so with zeros in the extra
    channels the UNet computes exactly what it did. (The authors keep the bias; diffusers' training
    script zero-initialises a new conv and forgets it.)"""
    old = unet_config.in_channels
    kernel = unet_params["conv_in"]["kernel"]                        # HWIO
    if kernel.shape[2] != old:
        raise WeightsError(f"conv_in kernel has {kernel.shape[2]} input channels, the config says {old}")
    if new_in_channels == old:
        return unet_params, unet_config
    if new_in_channels < old:
        raise WeightsError(f"cannot shrink conv_in from {old} to {new_in_channels} input channels")
    xp = np if isinstance(kernel, np.ndarray) else jnp   # jax arrays stay jax arrays
    extra = xp.zeros(kernel.shape[:2] + (new_in_channels - old,) + kernel.shape[3:], kernel.dtype)
    conv_in = dict(unet_params["conv_in"], kernel=xp.concatenate([kernel, extra], axis=2))
    return dict(unet_params, conv_in=conv_in), dataclasses.replace(unet_config, in_channels=new_in_channels)
