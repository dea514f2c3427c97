"""A latent cache on disk: VAE posterior moments (+ text embeddings or token ids) of edit pairs.

    <cache>/cache_info.json          {"num_examples", "shapes": {key: per-example shape}, "dtype", "source"}
    <cache>/latents.array_record     one record (an .npz) per example

Record keys: `input_moments`, `edited_moments` (h, w, 2C) fp32 = concat(mean, logvar) of the VAE
posterior, and the instruction as `text_embedding` (77, D) fp32 (a frozen text encoder) and/or
`input_ids` (77,) int32 (a text encoder trained with the UNet, as the demo model's).
ip2p_jax.train.latent_cache writes caches; `LatentCacheReader` is the training data source.
"""
from __future__ import annotations

import io
import json
import os
from typing import Iterable

import numpy as np

from ip2p_jax.errors import Ip2pError

INFO_FILE = "cache_info.json"
RECORDS_FILE = "latents.array_record"
MOMENT_KEYS = ("input_moments", "edited_moments")
TEXT_KEYS = ("text_embedding", "input_ids")
STATE_VERSION = 1


class LatentCacheError(Ip2pError):
    """A cache folder that is missing, incomplete or does not fit the run."""


def encode_record(example: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v, np.int32 if k == "input_ids" else np.float32) for k, v in example.items()})
    return buf.getvalue()


def decode_record(data: bytes) -> dict:
    with np.load(io.BytesIO(data)) as z:
        return {k: z[k] for k in z.files}


def write_records(out_dir: str, examples: Iterable[dict], *, source: str = "") -> dict:
    """Write per-example dicts (MOMENT_KEYS + one or both TEXT_KEYS) as a cache folder, atomically."""
    from array_record.python.array_record_module import ArrayRecordWriter  # optional heavy dependency

    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir):
        raise LatentCacheError(f"{out_dir}: already exists")
    tmp = out_dir + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    writer = ArrayRecordWriter(os.path.join(tmp, RECORDS_FILE), "group_size:1")
    count, shapes = 0, None
    try:
        for example in examples:
            writer.write(encode_record(example))
            shapes = {k: list(np.shape(v)) for k, v in example.items()}
            count += 1
    finally:
        writer.close()
    info = {"num_examples": count, "shapes": shapes, "dtype": "float32", "source": source}
    with open(os.path.join(tmp, INFO_FILE), "w") as f:
        json.dump(info, f, indent=2)
    os.replace(tmp, out_dir)
    return info


def read_info(path: str) -> dict:
    info_path = os.path.join(path, INFO_FILE)
    if not os.path.isfile(info_path):
        raise LatentCacheError(f"{path}: not a latent cache (no {INFO_FILE}); build one with build_cache "
                               f"(or the demo's encode stage)")
    with open(info_path) as f:
        return json.load(f)


class LatentCacheReader:
    """Iterator of host-local batches from a cache; shuffled each epoch, resumable (state = step).

    Host h of H takes stream positions h, h + H, ... of each global batch, like the TFDS pipeline.
    """

    def __init__(self, path: str, *, global_batch_size: int, seed: int = 0, shuffle: bool = True,
                 process_index: int = 0, process_count: int = 1):
        self.info = read_info(path)
        if self.info["num_examples"] < global_batch_size:
            raise LatentCacheError(f"{path}: {self.info['num_examples']} examples, fewer than one global batch "
                                   f"({global_batch_size})")
        if global_batch_size % process_count:
            raise LatentCacheError(f"global batch {global_batch_size} does not split over {process_count} processes")
        self.path, self.seed, self.shuffle = path, seed, shuffle
        self.global_batch, self.pi, self.pc = global_batch_size, process_index, process_count
        self.local = global_batch_size // process_count
        self._step, self._it = 0, None

    @property
    def num_units(self) -> int:
        return self.info["num_examples"]

    def _dataset(self):
        import grain  # optional heavy dependency

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
