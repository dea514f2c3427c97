"""The run's input stream from config.data: synthetic pairs, an edit_pairs TFDS dataset, or a latent cache.

Every source is an iterator of this host's batches (numpy dicts, local batch = global / hosts)
with JSON `get_state()` / `set_state()`, so the checkpoint resumes it at the next batch.
"""
from __future__ import annotations

import os

import jax
import numpy as np

from ip2p_jax.data.augment import AugmentConfig
from ip2p_jax.data.latent_cache import LatentCacheReader
from ip2p_jax.errors import Ip2pError
from ip2p_jax.train.synthetic import SyntheticPairs

SOURCES = ("synthetic", "tfds", "latent_cache")
BATCH_KEYS = ("input_image", "edited_image", "input_ids",                    # live
              "input_ids_2", "time_ids",                                     # live, SDXL
              "input_moments", "edited_moments", "text_embedding",           # latent cache
              "image")                                                       # autoencoder


class DataConfigError(Ip2pError):
    """config.data names no usable source."""


def input_workers(setting: int) -> int:
    """config.data.workers: -1 (the default) = what this host has: a worker process per 4 of its cores,
    at most 8 (0 on small machines: batches are then built by threads in the training process)."""
    if setting >= 0:
        return int(setting)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(8, cores // 4)


def make_train_data(config, tokenizer, *, split: str | None = None, validation: bool = False,
                    process: tuple[int, int] | None = None, tokenizer_2=None):
    """Iterator over host-local batches of config.train.batch_size global examples per step.
    tokenizer_2 (SDXL): batches also carry 'input_ids_2' (and from tfds the crops' 'time_ids').

    validation: no shuffling or random augmentation (synthetic: other pairs). process: (index,
    count) to read as, default this host's (the validation set passes (0, 1): all of it everywhere).
    """
    d = config.data
    split = split or d.split
    pi, pc = process if process is not None else (jax.process_index(), jax.process_count())
    batch = config.train.batch_size
    if d.source == "synthetic":
        return SyntheticPairs(tokenizer, resolution=d.resolution, global_batch_size=batch,
                              seed=config.seed + (1 if validation else 0), num_examples=d.num_examples,
                              process_index=pi, process_count=pc, image_dtype=d.image_dtype,
                              tokenizer_2=tokenizer_2)
    if d.source == "tfds":
        # optional heavy dependency (tensorflow_datasets, grain)
        from ip2p_jax.data.builder import open_dataset
        from ip2p_jax.data.pipeline import EditPairPipeline, PipelineConfig

        if not d.path:
            raise DataConfigError("config.data.path is empty: give the TFDS data_dir (with config.data.name) "
                                  "or a dataset version folder")
        augment = AugmentConfig(min_resize=d.min_resize, max_resize=d.max_resize, crop_size=d.resolution,
                                flip_prob=0.5 if d.flip else 0.0, random=not validation)
        cfg = PipelineConfig(split=split, global_batch_size=batch, seed=config.seed, augment=augment,
                             shuffle=not validation, worker_count=0 if validation else input_workers(d.workers),
                             image_dtype=d.image_dtype)
        builder = open_dataset(d.path, d.name or None)
        if split not in builder.info.splits:
            key = "validation_split" if validation else "split"
            raise DataConfigError(f"--config.data.{key}={split!r}: the dataset {builder.data_dir} has no such split "
                                  f"(it has {', '.join(sorted(builder.info.splits)) or 'none'})")
        return EditPairPipeline(builder, tokenizer, cfg, process_index=pi, process_count=pc, tokenizer_2=tokenizer_2)
    if d.source == "latent_cache":
        return LatentCacheReader(d.path, global_batch_size=batch, seed=config.seed, shuffle=not validation,
                                 process_index=pi, process_count=pc)
    raise DataConfigError(f"config.data.source must be one of {SOURCES}, got {d.source!r}")


def model_inputs(batch: dict) -> dict:
    """The arrays the train step reads (drops bookkeeping such as the record 'index')."""
    return {k: np.asarray(v) for k, v in batch.items() if k in BATCH_KEYS}
