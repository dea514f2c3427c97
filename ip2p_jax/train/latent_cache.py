"""Encode a dataset once into a latent cache (ip2p_jax.data.latent_cache), then train without the VAE/CLIP.

    ip2p_jax.train.latent_cache.build_cache(config, out_dir)       # or scripts: see docs/training.md
    --config.data.source=latent_cache --config.data.path=OUT_DIR   # train from it

`build_cache` stores the frozen text encoder's embeddings; `write_cache(..., text_params=None)`
stores token ids instead (a text encoder trained with the UNet: the demo model). The train step
draws the posterior sample from the moments with the same per-example key as the live path, so
the cached and live paths give the same loss for the same examples and noise. The cache freezes
one view of each pair (no random resize/crop/flip per epoch).
"""
from __future__ import annotations

from typing import Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ip2p_jax.data.latent_cache import LatentCacheError, write_records
from ip2p_jax.progress import progress as progress_bar
from ip2p_jax.train.build import build
from ip2p_jax.train.data import make_train_data
from ip2p_jax.train.step import model_pixels


def encode_fn(vae, text_encoder=None):
    """jit(vae_params, text_params, input_image, edited_image, input_ids) -> the record arrays (fp32 moments;
    `text_embedding` with a text encoder, else the `input_ids` themselves)."""
    def encode(vae_params, text_params, input_image, edited_image, input_ids):
        def moments(x):
            mean, logvar = vae.apply({"params": vae_params}, model_pixels(x), method=vae.encode)
            return jnp.concatenate([mean, logvar], axis=-1).astype(jnp.float32)
        out = {"input_moments": moments(input_image), "edited_moments": moments(edited_image)}
        if text_encoder is None:
            out["input_ids"] = input_ids.astype(jnp.int32)
        else:
            out["text_embedding"] = text_encoder.apply({"params": text_params}, input_ids).astype(jnp.float32)
        return out
    return jax.jit(encode)


def write_cache(out_dir: str, batches, encode, vae_params, text_params=None, *, source: str = "",
                max_examples: Optional[int] = None, progress: bool = True) -> dict:
    """Encode `batches` (dicts with input_image, edited_image, input_ids) into `out_dir` (atomically)."""
    def examples() -> Iterator[dict]:
        count = 0
        with progress_bar(total=max_examples, desc="caching latents", unit="ex", enabled=progress) as bar:
            for batch in batches:
                out = jax.device_get(encode(vae_params, text_params, batch["input_image"], batch["edited_image"],
                                            batch["input_ids"]))
                n = len(out["input_moments"])
                if max_examples is not None:
                    n = min(n, max_examples - count)
                for i in range(n):
                    yield {k: np.asarray(v[i]) for k, v in out.items()}
                count += n
                bar.update(n)
                if max_examples is not None and count >= max_examples:
                    return
    return write_records(out_dir, examples(), source=source)


def build_cache(config, out_dir: str, *, split: Optional[str] = None, max_examples: Optional[int] = None) -> dict:
    """Encode config.data's split (one pass, no random augmentation) with the run's frozen VAE / text encoder."""
    if config.model.train_text_encoder:
        raise LatentCacheError("a latent cache stores text embeddings: it needs model.train_text_encoder=False")
    built = build(config)
    data = make_train_data(config, built.tokenizer, split=split, validation=True, process=(0, 1))
    total = max_examples
    if total is None:
        total = getattr(data, "num_units", None)
        if total is None:
            raise LatentCacheError("give max_examples for an endless source (synthetic)")
    encode = encode_fn(built.models.vae, built.models.text_encoder)
    try:
        return write_cache(out_dir, data, encode, built.frozen["vae"], built.frozen["text_encoder"],
                           source=f"{config.data.source}:{config.data.path}:{split or config.data.split}",
                           max_examples=total)
    finally:
        getattr(data, "close", lambda: None)()
