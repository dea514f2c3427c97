"""Conditioning dropout with the authors' semantics (instruct-pix2pix ddpm_edit.py).

One uniform r per example and probability p (0.05 in the recipe):
  r < p          drop the text only,
  p <= r < 2p    drop both,
  2p <= r < 3p   drop the image only.
Dropped text = the embedding of the empty prompt ""; dropped image = zeros. The text embedding may
be a pytree (SDXL: {'text', 'pooled'}): every leaf's row is replaced together, by the matching leaf
of the empty prompt's.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def dropout_masks(r: jax.Array, prob: float) -> tuple[jax.Array, jax.Array]:
    """(drop_text, drop_image) boolean (B,) masks from per-example uniforms r (B,)."""
    drop_text = r < 2 * prob
    drop_image = (r >= prob) & (r < 3 * prob)
    return drop_text, drop_image


def conditioning_dropout(r: jax.Array, prob: float, text_emb, null_emb, image_latents: jax.Array):
    """Apply the dropout: text_emb (B,L,D) -> null_emb (1,L,D) rows (or a pytree of (B,...) leaves ->
    null_emb's (1,...) leaves); image_latents (B,h,w,C) -> 0 rows. Returns (text, image)."""
    drop_text, drop_image = dropout_masks(r, prob)

    def drop(e, n):
        return jnp.where(drop_text.reshape((-1,) + (1,) * (e.ndim - 1)), n.astype(e.dtype), e)
    text = jax.tree.map(drop, text_emb, null_emb)
    image = jnp.where(drop_image[:, None, None, None], jnp.zeros_like(image_latents), image_latents)
    return text, image
