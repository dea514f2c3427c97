"""InstructPix2Pix dual classifier-free guidance on an interleaved 3-way batch.

Example b owns rows 3b, 3b+1, 3b+2 of the model batch:
    3b   (cond text, image)   -> e_cond
    3b+1 (null text, image)   -> e_img
    3b+2 (null text, zeros)   -> e_uncond
so a device holding a contiguous slice of examples holds exactly their rows. Latents are
NHWC; the model input is [noisy latents (scaled by the sampler), image latents] on channels.

Fewer branches are exact for some scales (`branches_for`, decided on the host): with image scale
1 the guided eps is e_img + s_T (e_cond - e_img) (no uncond rows), with both scales 1 it is
e_cond, with text scale 0 it is e_uncond + s_I (e_img - e_uncond). (Text scale 1 alone still
needs all three: e_cond + (s_I - 1)(e_img - e_uncond).) Rows keep the per-example interleaving.

The text conditioning is an array (SD: text embeddings) or a dict of per-example arrays (SDXL:
"text", "pooled" embeddings and "time_ids"); `expand_conditioning` builds its k-branch batch.
`guidance_rescale` (diffusers' rescale_noise_cfg, arXiv 2305.08891 sec. 3.4) optionally pulls
the guided eps' per-example std back toward e_cond's.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

BRANCHES = 3
FULL = ("cond", "image", "uncond")   # branch names: (text, image) = (instruction, image), ("", image), ("", 0)


def branches_for(text_scale, image_scale) -> tuple[str, ...]:
    """The branches the guided eps needs for these host-known scales (numbers or per-example
    arrays; every example must allow the reduction), FULL otherwise."""
    s_t, s_i = np.asarray(text_scale, np.float64), np.asarray(image_scale, np.float64)
    if np.all(s_i == 1.0):
        return ("cond",) if np.all(s_t == 1.0) else ("cond", "image")
    if np.all(s_t == 0.0):
        return ("image", "uncond")
    return FULL


def _check(branches) -> None:
    if branches not in (FULL, ("cond", "image"), ("cond",), ("image", "uncond")):
        raise ValueError(f"guidance: unsupported branches {branches!r}")


def _interleave(*arrays: jax.Array) -> jax.Array:
    """(B, ...) x k -> (kB, ...) with rows [a0, b0, c0, a1, b1, c1, ...]."""
    return jnp.stack(arrays, axis=1).reshape((-1,) + arrays[0].shape[1:])


def split_branches(x: jax.Array, k: int = BRANCHES) -> jax.Array:
    """(kB, ...) model-batch rows -> (B, k, ...): with the full 3: [:, 0] cond, [:, 1] image-only, [:, 2] uncond."""
    if x.shape[0] % k:
        raise ValueError(f"guidance: model batch of {x.shape[0]} rows is not a multiple of {k}")
    return x.reshape((x.shape[0] // k, k) + x.shape[1:])


def expand_latents(latents: jax.Array, image_latents: jax.Array, branches=FULL) -> jax.Array:
    """(B, h, w, C) noisy (already input-scaled) and image latents -> (kB, h, w, 2C) model input."""
    if latents.shape != image_latents.shape:
        raise ValueError(f"guidance: noisy latents {latents.shape} and image latents "
                         f"{image_latents.shape} differ in shape")
    image_latents = image_latents.astype(latents.dtype)
    with_image = jnp.concatenate([latents, image_latents], axis=-1)
    without = jnp.concatenate([latents, jnp.zeros_like(image_latents)], axis=-1)
    _check(branches)
    return _interleave(*[without if b == "uncond" else with_image for b in branches])


def expand_text(cond_emb: jax.Array, null_emb: jax.Array, branches=FULL) -> jax.Array:
    """(B, L, D) instruction embeddings and the empty prompt's (L, D), (1, L, D) or (B, L, D) -> (kB, L, D)."""
    null = null_emb[None] if null_emb.ndim == 2 else null_emb
    if null.ndim != 3 or null.shape[1:] != cond_emb.shape[1:] or null.shape[0] not in (1, cond_emb.shape[0]):
        raise ValueError(f"guidance: null embedding {null_emb.shape} does not match instruction "
                         f"embeddings {cond_emb.shape}")
    null = jnp.broadcast_to(null, cond_emb.shape).astype(cond_emb.dtype)
    _check(branches)
    return _interleave(*[cond_emb if b == "cond" else null for b in branches])


def _expand_leaf(cond: jax.Array, null: jax.Array | None, branches, name: str) -> jax.Array:
    if null is None:   # the same on every branch (SDXL's time ids)
        return _interleave(*[cond for _ in branches])
    null = null[None] if null.ndim == cond.ndim - 1 else null
    if null.ndim != cond.ndim or null.shape[1:] != cond.shape[1:] or null.shape[0] not in (1, cond.shape[0]):
        raise ValueError(f"guidance: null {name} {null.shape} does not match the instruction's {cond.shape}")
    null = jnp.broadcast_to(null, cond.shape).astype(cond.dtype)
    return _interleave(*[cond if b == "cond" else null for b in branches])


def expand_conditioning(cond, null, branches=FULL):
    """The text conditioning of the k-branch batch. cond: (B, L, D) embeddings (as expand_text) or a
    dict of per-example arrays (B, ...); null: the same structure, each entry without or with a
    leading 1 or B axis, used on the null-text branches. A dict entry missing from null (SDXL's
    time ids) is the example's own on every branch."""
    if not isinstance(cond, dict):
        return expand_text(cond, null, branches)
    _check(branches)
    unknown = set(null) - set(cond)
    if unknown:
        raise ValueError(f"guidance: null conditioning has entries {sorted(unknown)} the instruction's lacks")
    return {name: _expand_leaf(c, null.get(name), branches, name) for name, c in cond.items()}


def rescale_noise_cfg(guided: jax.Array, e_cond: jax.Array, guidance_rescale) -> jax.Array:
    """diffusers' rescale_noise_cfg: mix `guided` with itself rescaled to e_cond's per-example std
    (unbiased, over all but the batch axis) by the factor guidance_rescale."""
    axes = tuple(range(1, guided.ndim))
    std_cond = jnp.std(e_cond, axis=axes, keepdims=True, ddof=1)
    std_guided = jnp.std(guided, axis=axes, keepdims=True, ddof=1)
    return guidance_rescale * (guided * (std_cond / std_guided)) + (1 - guidance_rescale) * guided


def expand(latents, image_latents, cond_emb, null_emb) -> tuple[jax.Array, jax.Array]:
    """Model inputs for one step: ((3B, h, w, 2C) latents, (3B, L, D) text)."""
    return expand_latents(latents, image_latents), expand_text(cond_emb, null_emb)


def combine(eps: jax.Array, text_scale, image_scale, branches=FULL, guidance_rescale: float = 0.0) -> jax.Array:
    """(kB, ...) branch outputs -> (B, ...) guided eps (float32).

    e_uncond + s_T (e_cond - e_img) + s_I (e_img - e_uncond); scales are scalars or (B,) arrays.
    With fewer branches (branches_for), the reduced formula of the module docstring.
    guidance_rescale (a host number; 0: off) applies rescale_noise_cfg where guidance is used
    (the cond branch and another one), as diffusers' SDXL InstructPix2Pix pipeline does.
    """
    guided = _combine(eps, text_scale, image_scale, branches)
    if guidance_rescale and "cond" in branches and len(branches) > 1:
        e_cond = split_branches(eps, len(branches))[:, branches.index("cond")].astype(jnp.float32)
        guided = rescale_noise_cfg(guided, e_cond, guidance_rescale)
    return guided


def _combine(eps: jax.Array, text_scale, image_scale, branches) -> jax.Array:
    _check(branches)
    e = split_branches(eps, len(branches)).astype(jnp.float32)
    got = {b: e[:, n] for n, b in enumerate(branches)}
    first = e[:, 0]
    per_example = lambda s: jnp.reshape(jnp.asarray(s, jnp.float32), (-1,) + (1,) * (first.ndim - 1))
    s_t, s_i = per_example(text_scale), per_example(image_scale)
    for name, s in (("text_scale", s_t), ("image_scale", s_i)):
        if s.shape[0] not in (1, first.shape[0]):
            raise ValueError(f"guidance: {name} has {s.shape[0]} values for a batch of {first.shape[0]}")
    if branches == ("cond",):
        return got["cond"]
    if branches == ("cond", "image"):
        return got["image"] + s_t * (got["cond"] - got["image"])
    if branches == ("image", "uncond"):
        return got["uncond"] + s_i * (got["image"] - got["uncond"])
    e_cond, e_img, e_uncond = got["cond"], got["image"], got["uncond"]
    return e_uncond + s_t * (e_cond - e_img) + s_i * (e_img - e_uncond)


def guided_eps_fn(model_fn: Callable[[jax.Array, jax.Array, Any, jax.Array], jax.Array],
                  image_latents: jax.Array, cond_emb: jax.Array, null_emb: jax.Array,
                  text_scale, image_scale, branches=FULL,
                  guidance_rescale: float = 0.0) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    """The `eps_fn(model_input, timestep, i)` samplers.sample needs, from a 3-way-batch model.

    model_fn(latents (kB, h, w, 2C), timesteps (kB,), text, i) -> eps (kB, h, w, C), k the number of
    branches (3, or fewer from branches_for); text is the expand_conditioning of cond_emb / null_emb
    ((kB, L, D), or SDXL's dict), expanded once, outside the sampling loop body; i is the step index
    (the edit looks up its precomputed time embedding with it).
    """
    text = expand_conditioning(cond_emb, null_emb, branches)

    def eps_fn(noisy_scaled: jax.Array, timestep: jax.Array, i: jax.Array) -> jax.Array:
        x = expand_latents(noisy_scaled, image_latents, branches)
        t = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (x.shape[0],))
        return combine(model_fn(x, t, text, i), text_scale, image_scale, branches, guidance_rescale)

    return eps_fn
