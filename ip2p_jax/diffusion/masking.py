"""Masked edits: outside the mask the sample follows the input's own noising trajectory.

After each sampler step i the sample x (now at noise level k = i + 1) is blended with the clean
input latents noised to that level, using the sample's own starting noise (so the result is
deterministic per seed):
    x' = m x + (1 - m) noised(k),   m the mask on the latent grid (1 = editable, soft allowed).
Sigma-space samplers keep x = x0 + sigma_k eps, so noised(k) = x0 + sigma_k noise (at the last
step sigma = 0: exactly the clean latents). DDIM keeps the variance-preserving sample,
sqrt(a_k) (x0 + sigma_k noise) with a_k its alpha-bar (sigma_k = sqrt((1 - a_k) / a_k)). A plan's
alphas_cumprod are zeros for the sigma-space samplers, so one formula serves a generic plan.
A mask of ones leaves x as it is, bit for bit (op by op; a compiled program may round the
surrounding step differently, so the pipeline runs unmasked rows in its unmasked program).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from ip2p_jax.diffusion.samplers import Plan


def noised(plan: Plan, k, clean: jax.Array, noise: jax.Array) -> jax.Array:
    """`clean` latents (scaled like the sampler's x0) noised with `noise` to the plan's noise level
    k (0 = the start, steps = the end), in the form the sampler keeps its sample."""
    a = plan.alphas_cumprod[k]
    signal = jnp.where(a > 0, jnp.sqrt(jnp.maximum(a, 1e-30)), 1.0)
    return signal * (clean.astype(jnp.float32) + plan.sigmas[k] * noise.astype(jnp.float32))


def blend(plan: Plan, i, x: jax.Array, clean: jax.Array, noise: jax.Array, mask: jax.Array) -> jax.Array:
    """The sample after step i, kept editable where mask is 1 and on the input's trajectory where
    it is 0. mask broadcasts against x (e.g. (B, h, w, 1))."""
    m = mask.astype(jnp.float32)
    return m * x + (1.0 - m) * noised(plan, i + 1, clean, noise)


def blend_after_step(plan: Plan, clean: jax.Array, noise: jax.Array,
                     mask: jax.Array) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The `after_step(i, x)` hook of samplers.sample for a masked edit."""
    return lambda i, x: blend(plan, i, x, clean, noise, mask)


def latent_mask(pixel_mask: jax.Array, factor: int) -> jax.Array:
    """(B, H, W, 1) pixel mask -> (B, H/f, W/f, 1) on the latent grid: the mean of each f x f block."""
    b, h, w, c = pixel_mask.shape
    return pixel_mask.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))
