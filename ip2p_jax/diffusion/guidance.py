"""InstructPix2Pix dual classifier-free guidance on an interleaved 3-way batch.

Example b owns rows 3b, 3b+1, 3b+2 of the model batch:
    3b   (cond text, image)   -> e_cond
    3b+1 (null text, image)   -> e_img
    3b+2 (null text, zeros)   -> e_uncond
so a device holding a contiguous slice of examples holds exactly their rows. Latents are
NHWC; the model input is [noisy latents (scaled by the sampler), image latents] on channels.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

BRANCHES = 3


def _interleave(a: jax.Array, b: jax.Array, c: jax.Array) -> jax.Array:
    """(B, ...) x3 -> (3B, ...) with rows [a0, b0, c0, a1, b1, c1, ...]."""
    return jnp.stack([a, b, c], axis=1).reshape((-1,) + a.shape[1:])


def split_branches(x: jax.Array) -> jax.Array:
    """(3B, ...) model-batch rows -> (B, 3, ...): [:, 0] cond, [:, 1] image-only, [:, 2] uncond."""
    if x.shape[0] % BRANCHES:
        raise ValueError(f"guidance: model batch of {x.shape[0]} rows is not a multiple of {BRANCHES}")
    return x.reshape((x.shape[0] // BRANCHES, BRANCHES) + x.shape[1:])


def expand_latents(latents: jax.Array, image_latents: jax.Array) -> jax.Array:
    """(B, h, w, C) noisy (already input-scaled) and image latents -> (3B, h, w, 2C) model input."""
    if latents.shape != image_latents.shape:
        raise ValueError(f"guidance: noisy latents {latents.shape} and image latents "
                         f"{image_latents.shape} differ in shape")
    image_latents = image_latents.astype(latents.dtype)
    with_image = jnp.concatenate([latents, image_latents], axis=-1)
    without = jnp.concatenate([latents, jnp.zeros_like(image_latents)], axis=-1)
    return _interleave(with_image, with_image, without)


def expand_text(cond_emb: jax.Array, null_emb: jax.Array) -> jax.Array:
    """(B, L, D) instruction embeddings and the empty prompt's (L, D), (1, L, D) or (B, L, D) -> (3B, L, D)."""
    null = null_emb[None] if null_emb.ndim == 2 else null_emb
    if null.ndim != 3 or null.shape[1:] != cond_emb.shape[1:] or null.shape[0] not in (1, cond_emb.shape[0]):
        raise ValueError(f"guidance: null embedding {null_emb.shape} does not match instruction "
                         f"embeddings {cond_emb.shape}")
    null = jnp.broadcast_to(null, cond_emb.shape).astype(cond_emb.dtype)
    return _interleave(cond_emb, null, null)


def expand(latents, image_latents, cond_emb, null_emb) -> tuple[jax.Array, jax.Array]:
    """Model inputs for one step: ((3B, h, w, 2C) latents, (3B, L, D) text)."""
    return expand_latents(latents, image_latents), expand_text(cond_emb, null_emb)


def combine(eps: jax.Array, text_scale, image_scale) -> jax.Array:
    """(3B, ...) branch outputs -> (B, ...) guided eps (float32).

    e_uncond + s_T (e_cond - e_img) + s_I (e_img - e_uncond); scales are scalars or (B,) arrays.
    """
    e = split_branches(eps).astype(jnp.float32)
    e_cond, e_img, e_uncond = e[:, 0], e[:, 1], e[:, 2]
    per_example = lambda s: jnp.reshape(jnp.asarray(s, jnp.float32), (-1,) + (1,) * (e_cond.ndim - 1))
    s_t, s_i = per_example(text_scale), per_example(image_scale)
    for name, s in (("text_scale", s_t), ("image_scale", s_i)):
        if s.shape[0] not in (1, e_cond.shape[0]):
            raise ValueError(f"guidance: {name} has {s.shape[0]} values for a batch of {e_cond.shape[0]}")
    return e_uncond + s_t * (e_cond - e_img) + s_i * (e_img - e_uncond)


def guided_eps_fn(model_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
                  image_latents: jax.Array, cond_emb: jax.Array, null_emb: jax.Array,
                  text_scale, image_scale) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    """The `eps_fn(model_input, timestep, i)` samplers.sample needs, from a 3-way-batch model
    (the step index i is not used).

    model_fn(latents (3B, h, w, 2C), timesteps (3B,), text (3B, L, D)) -> eps (3B, h, w, C).
    The text batch is expanded once, outside the sampling loop body.
    """
    text = expand_text(cond_emb, null_emb)

    def eps_fn(noisy_scaled: jax.Array, timestep: jax.Array, i: jax.Array) -> jax.Array:
        del i   # guidance is the same at every step
        x = expand_latents(noisy_scaled, image_latents)
        t = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (x.shape[0],))
        return combine(model_fn(x, t, text), text_scale, image_scale)

    return eps_fn
