"""Conditioning dropout with the authors' semantics (instruct-pix2pix ddpm_edit.py).

One uniform r per example and probability p (0.05 in the recipe):
  r < p          drop the text only,
  p <= r < 2p    drop both,
  2p <= r < 3p   drop the image only.
Dropped text = the embedding of the empty prompt ""; dropped image = zeros.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def dropout_masks(r: jax.Array, prob: float) -> tuple[jax.Array, jax.Array]:
    """(drop_text, drop_image) boolean (B,) masks from per-example uniforms r (B,)."""
    drop_text = r < 2 * prob
    drop_image = (r >= prob) & (r < 3 * prob)
    return drop_text, drop_image


def conditioning_dropout(r: jax.Array, prob: float, text_emb: jax.Array, null_emb: jax.Array,
                         image_latents: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Apply the dropout: text_emb (B,L,D) -> null_emb (1,L,D) rows; image_latents (B,h,w,C) -> 0 rows."""
    drop_text, drop_image = dropout_masks(r, prob)
    text = jnp.where(drop_text[:, None, None], null_emb.astype(text_emb.dtype), text_emb)
    image = jnp.where(drop_image[:, None, None, None], jnp.zeros_like(image_latents), image_latents)
    return text, image
