"""Precomputed VAE moments and text embeddings: encode a dataset once, then train without the VAE/CLIP.

    ip2p_jax.train.latent_cache.build_cache(config, out_dir)       # or scripts: see docs/training.md
    --config.data.source=latent_cache --config.data.path=OUT_DIR   # train from it

Each array_record record is one example (an .npz): `input_moments`, `edited_moments` (h, w, 2C) =
concat(mean, logvar) of the VAE posterior, `text_embedding` (77, D), fp32. The train step draws the
posterior sample from the moments with the same per-example key as the live path, so the cached
and live paths give the same loss for the same examples and noise. The cache freezes one view of
each pair (no random resize/crop/flip per epoch) and needs a frozen text encoder.
"""
from __future__ import annotations

import io
import json
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from ip2p_jax.errors import Ip2pError

INFO_FILE = "cache_info.json"
RECORDS_FILE = "latents.array_record"
KEYS = ("input_moments", "edited_moments", "text_embedding")
STATE_VERSION = 1


class LatentCacheError(Ip2pError):
    """A cache folder that is missing, incomplete or does not fit the run."""


def encode_fn(models, compute_dtype=jnp.float32):
    """jit(params_vae, params_text, input_image, edited_image, input_ids) -> dict of KEYS (fp32)."""
    vae, text = models.vae, models.text_encoder

    def encode(vae_params, text_params, input_image, edited_image, input_ids):
        def moments(x):
            mean, logvar = vae.apply({"params": vae_params}, x, method=vae.encode)
            return jnp.concatenate([mean, logvar], axis=-1).astype(jnp.float32)
        emb = text.apply({"params": text_params}, input_ids).astype(jnp.float32)
        return {"input_moments": moments(input_image), "edited_moments": moments(edited_image),
                "text_embedding": emb}
    return jax.jit(encode)


def _encode_record(example: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(example[k], np.float32) for k in KEYS})
    return buf.getvalue()


def decode_record(data: bytes) -> dict:
    with np.load(io.BytesIO(data)) as z:
        return {k: z[k] for k in KEYS}


def write_cache(out_dir: str, batches, encode, vae_params, text_params, *, source: str = "",
                max_examples: Optional[int] = None, progress: bool = True) -> dict:
    """Encode `batches` (dicts with input_image, edited_image, input_ids) into `out_dir` (atomically)."""
    from array_record.python.array_record_module import ArrayRecordWriter
    from tqdm import tqdm

    out_dir = os.path.abspath(out_dir)
    tmp = out_dir + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    writer = ArrayRecordWriter(os.path.join(tmp, RECORDS_FILE), "group_size:1")
    count, shapes = 0, None
    bar = tqdm(total=max_examples, desc="caching latents", unit="ex", disable=not progress)
    try:
        for batch in batches:
            out = jax.device_get(encode(vae_params, text_params, batch["input_image"], batch["edited_image"],
                                        batch["input_ids"]))
            n = len(out["text_embedding"])
            if max_examples is not None:
                n = min(n, max_examples - count)
            for i in range(n):
                writer.write(_encode_record({k: out[k][i] for k in KEYS}))
            shapes = {k: list(out[k].shape[1:]) for k in KEYS}
            count += n
            bar.update(n)
            if max_examples is not None and count >= max_examples:
                break
    finally:
        writer.close()
        bar.close()
    info = {"num_examples": count, "shapes": shapes, "dtype": "float32", "source": source}
    with open(os.path.join(tmp, INFO_FILE), "w") as f:
        json.dump(info, f, indent=2)
    if os.path.exists(out_dir):
        raise LatentCacheError(f"{out_dir}: already exists")
    os.replace(tmp, out_dir)
    return info


def build_cache(config, out_dir: str, *, split: Optional[str] = None, max_examples: Optional[int] = None) -> dict:
    """Encode config.data's split (one pass, no random augmentation) with the run's frozen VAE / text encoder."""
    from ip2p_jax.train.build import build
    from ip2p_jax.train.data import make_train_data

    if config.model.train_text_encoder:
        raise LatentCacheError("a latent cache stores text embeddings: it needs model.train_text_encoder=False")
    built = build(config)
    data = make_train_data(config, built.tokenizer, split=split, validation=True, process=(0, 1))
    total = max_examples
    if total is None:
        total = getattr(data, "num_units", None)
        if total is None:
            raise LatentCacheError("give max_examples for an endless source (synthetic)")
    encode = encode_fn(built.models)
    try:
        return write_cache(out_dir, data, encode, built.frozen["vae"], built.frozen["text_encoder"],
                           source=f"{config.data.source}:{config.data.path}:{split or config.data.split}",
                           max_examples=total)
    finally:
        getattr(data, "close", lambda: None)()


class LatentCacheReader:
    """Iterator of host-local batches of KEYS from a cache; shuffled each epoch, resumable (state = step).

    Host h of H takes stream positions h, h + H, ... of each global batch, like the TFDS pipeline.
    """

    def __init__(self, path: str, *, global_batch_size: int, seed: int = 0, shuffle: bool = True,
                 process_index: int = 0, process_count: int = 1):
        info_path = os.path.join(path, INFO_FILE)
        if not os.path.isfile(info_path):
            raise LatentCacheError(f"{path}: not a latent cache (no {INFO_FILE}); build one with build_cache")
        with open(info_path) as f:
            self.info = json.load(f)
        if self.info["num_examples"] < global_batch_size:
            raise LatentCacheError(f"{path}: {self.info['num_examples']} examples, fewer than one global batch "
                                   f"({global_batch_size})")
        if global_batch_size % process_count:
            raise LatentCacheError(f"global batch {global_batch_size} does not split over {process_count} processes")
        self.path, self.seed, self.shuffle = path, seed, shuffle
        self.global_batch, self.pi, self.pc = global_batch_size, process_index, process_count
        self.local = global_batch_size // process_count
        self._step, self._it = 0, None

    def _dataset(self):
        import grain

        source = grain.sources.ArrayRecordDataSource([os.path.join(self.path, RECORDS_FILE)])
        ds = grain.MapDataset.source(source)
        if self.shuffle:
            ds = ds.shuffle(seed=self.seed)
        ds = ds.repeat(None)[self.pi::self.pc].map(decode_record)
        return ds.batch(self.local, drop_remainder=True)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._it = iter(self._dataset()[self._step:].to_iter_dataset())
        self._step += 1
        return next(self._it)

    def get_state(self) -> dict:
        return {"version": STATE_VERSION, "step": self._step, "seed": self.seed, "shuffle": self.shuffle,
                "global_batch_size": self.global_batch, "num_examples": self.info["num_examples"]}

    def set_state(self, state: dict) -> None:
        want = self.get_state()
        diff = [k for k in want if k != "step" and state.get(k) != want[k]]
        if diff:
            raise LatentCacheError(f"latent cache iterator state does not fit this run: differs in {diff}")
        self._step, self._it = int(state["step"]), None

    def close(self):
        self._it = None
