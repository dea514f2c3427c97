"""Deterministic, resumable grain input pipeline over an `edit_pairs` TFDS dataset.

    units (records, or prompts with `one_seed_per_prompt`) -> seeded shuffle, new order each epoch
    -> repeat -> this host's slice -> read + decode + joint augment + tokenise -> batch
    -> threads / worker processes (`mp_prefetch`)

Global stream position p (0, 1, 2, ...) is the unit of determinism: host h of H takes positions
h, h + H, h + 2H, ...; so global step s holds positions [s*G, (s+1)*G) (G = global batch) on any
number of hosts and workers. All randomness of the example at position p (the seed chosen for
its prompt, resize, crop, flip) comes from `np.random.default_rng([seed, p])`.

Batches are built at the MapDataset level, so `mp_prefetch` workers produce whole batches and
the batch contents do not depend on the worker count. The iterator state is just the step,
plus a fingerprint of the settings it is valid for: JSON, the same on every host.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import numpy as np
from absl import flags

from ip2p_jax.errors import Ip2pError
from ip2p_jax.data import augment as aug
from ip2p_jax.data.builder import IMAGE_FEATURES, encoded_source, open_dataset, read_prompt_hashes
from ip2p_jax.tokenizer import MAX_LENGTH, fast_tokenizer, load_tokenizer, tokenize

log = logging.getLogger(__name__)

BATCH_KEYS = ("input_image", "edited_image", "input_ids", "index")
STATE_VERSION = 1


class PipelineError(Ip2pError):
    """Bad pipeline settings or an iterator state that does not fit this pipeline."""


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    split: str = "train"
    global_batch_size: int = 32
    seed: int = 0                        # shuffle order and per-example randomness, < 2**32
    num_epochs: int | None = None        # None: repeat forever
    shuffle: bool = True
    one_seed_per_prompt: bool = False    # an epoch = one random seed (pair) of each prompt (authors' loader)
    augment: aug.AugmentConfig = aug.AugmentConfig()
    image_dtype: str = "float32"         # "float32": values in [-1, 1]; "uint8": raw 0..255
    max_length: int = MAX_LENGTH
    worker_count: int = 0                # grain worker processes (0: in this process)
    worker_buffer_size: int = 2          # batches buffered per worker
    read_threads: int = 2                # threads per process, each building whole batches
    prefetch_batches: int = 2            # batches buffered ahead per process

    def fingerprint(self, num_units: int) -> dict:
        """What a saved state must agree with (not process count, workers or threads)."""
        return {"split": self.split, "global_batch_size": self.global_batch_size, "seed": self.seed,
                "num_epochs": self.num_epochs, "shuffle": self.shuffle,
                "one_seed_per_prompt": self.one_seed_per_prompt, "num_units": num_units,
                "augment": dataclasses.asdict(self.augment)}


def prompt_groups(hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Records grouped by prompt: (members, offsets); group g = members[offsets[g]:offsets[g+1]]."""
    _, inverse = np.unique(hashes, return_inverse=True)
    members = np.argsort(inverse, kind="stable").astype(np.int64)
    offsets = np.searchsorted(inverse[members], np.arange(inverse.max() + 2 if len(inverse) else 1))
    return members, offsets.astype(np.int64)


class _MakeExample:
    """Global position + unit -> one example dict (runs in grain threads / worker processes)."""

    def __init__(self, source, tokenizer, cfg: PipelineConfig, process_index: int, process_count: int,
                 groups: tuple[np.ndarray, np.ndarray] | None, tokenizer_2=None):
        self.source, self.tokenizer, self.cfg, self.tokenizer_2 = source, tokenizer, cfg, tokenizer_2
        self.process_index, self.process_count, self.groups = process_index, process_count, groups

    def __call__(self, local_index: int, unit: int) -> dict:
        position = self.process_index + self.process_count * local_index
        rng = np.random.default_rng([self.cfg.seed, position])
        if self.groups is not None:
            members, offsets = self.groups
            lo, hi = offsets[unit], offsets[unit + 1]
            record = int(members[lo + rng.integers(hi - lo)])
        else:
            record = int(unit)
        ex = self.source[record]
        params = aug.draw_params(self.cfg.augment, rng)
        draft = params.size if self.cfg.augment.draft_decode else None
        x0, x1 = (aug.apply_params(aug.decode_rgb(ex[k], draft), params, self.cfg.augment.crop_size)
                  for k in IMAGE_FEATURES)
        if self.cfg.image_dtype == "float32":
            x0, x1 = aug.to_float(x0), aug.to_float(x1)
        else:
            x0, x1 = np.ascontiguousarray(x0), np.ascontiguousarray(x1)
        instruction = ex["instruction"]
        instruction = instruction.decode("utf-8") if isinstance(instruction, bytes) else instruction
        ids = tokenize(self.tokenizer, [instruction], self.cfg.max_length)[0]
        out = {"input_image": x0, "edited_image": x1, "input_ids": ids, "index": np.int32(record)}
        if self.tokenizer_2 is not None:   # SDXL: the second tokenizer's ids and the crop's time ids
            out["input_ids_2"] = tokenize(self.tokenizer_2, [instruction], self.cfg.max_length)[0]
            original = aug.image_size(ex[IMAGE_FEATURES[1]])   # the edited image's (the target's)
            out["time_ids"] = aug.sdxl_time_ids(original, params, self.cfg.augment.crop_size)
        return out


def _process_info(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # not at the top: grain's worker processes import this module and need no jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return int(process_index), int(process_count)


class EditPairPipeline:
    """Iterator of this host's batches: dict of numpy arrays, local batch = global / process_count.

      input_image, edited_image: (B, crop, crop, 3) float32 in [-1, 1] (or uint8)
      input_ids:                 (B, 77) int32 (tokenised instruction)
      index:                     (B,) int32, the record each example came from
      with tokenizer_2 (SDXL) also
      input_ids_2:               (B, 77) int32 (the second tokenizer's ids)
      time_ids:                  (B, 6) float32 (augment.sdxl_time_ids of each example's crop)
    """

    def __init__(self, dataset, tokenizer, config: PipelineConfig = PipelineConfig(), *,
                 process_index: int | None = None, process_count: int | None = None, tokenizer_2=None):
        """`dataset`: a TFDS builder (`open_dataset(...)`) or a dataset version folder;
        `tokenizer` (and `tokenizer_2`): a loaded tokenizer or a folder for `load_tokenizer`."""
        self.config = cfg = config
        self.builder = open_dataset(dataset) if isinstance(dataset, str) else dataset
        self.tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        self.tokenizer_2 = load_tokenizer(tokenizer_2) if isinstance(tokenizer_2, str) else tokenizer_2
        self.process_index, self.process_count = _process_info(process_index, process_count)
        if cfg.split not in self.builder.info.splits:
            raise PipelineError(f"split {cfg.split!r} not in the dataset (has {list(self.builder.info.splits)})")
        if cfg.global_batch_size % self.process_count:
            raise PipelineError(f"global batch {cfg.global_batch_size} is not divisible by the "
                                f"{self.process_count} processes")
        if cfg.image_dtype not in aug.IMAGE_DTYPES:
            raise PipelineError(f"image_dtype must be one of {aug.IMAGE_DTYPES}, got {cfg.image_dtype!r}")
        if not 0 <= cfg.seed < 2**32:
            raise PipelineError(f"seed must be in [0, 2**32), got {cfg.seed}")
        self.local_batch_size = cfg.global_batch_size // self.process_count
        self.source = encoded_source(self.builder, cfg.split)
        self.groups = prompt_groups(read_prompt_hashes(self.builder, cfg.split)) if cfg.one_seed_per_prompt else None
        self.num_units = len(self.groups[1]) - 1 if self.groups is not None else len(self.source)
        if self.num_units < cfg.global_batch_size:
            raise PipelineError(f"split {cfg.split!r} has {self.num_units} {'prompts' if self.groups else 'examples'}, "
                                f"fewer than one global batch ({cfg.global_batch_size})")
        self.steps_per_epoch = self.num_units // cfg.global_batch_size
        self._step = 0
        self._it = None

    # -- the grain dataset
    def _map_dataset(self):
        import grain  # optional heavy dependency

        cfg = self.config
        ds = grain.MapDataset.range(self.num_units)
        if cfg.shuffle:
            ds = ds.shuffle(seed=cfg.seed)  # a different permutation each epoch
        ds = ds.repeat(cfg.num_epochs)
        if cfg.num_epochs is not None:  # every host gets the same number of full batches
            ds = ds[: len(ds) // cfg.global_batch_size * cfg.global_batch_size]
        ds = ds[self.process_index::self.process_count]
        tok = fast_tokenizer(self.tokenizer) or self.tokenizer  # light to pickle into workers
        tok_2 = None if self.tokenizer_2 is None else fast_tokenizer(self.tokenizer_2) or self.tokenizer_2
        ds = ds.map_with_index(_MakeExample(self.source, tok, cfg, self.process_index,
                                            self.process_count, self.groups, tok_2))
        return ds.batch(self.local_batch_size, drop_remainder=True)

    def _iterator(self, step: int):
        import grain  # optional heavy dependency

        cfg = self.config
        ds = self._map_dataset()[step:]
        it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                                     prefetch_buffer_size=cfg.prefetch_batches))
        if cfg.worker_count > 0:
            _absl_flags_parsed()
            it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=cfg.worker_count, per_worker_buffer_size=cfg.worker_buffer_size))
        return iter(it_ds)

    # -- iteration and state
    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            self._it = self._iterator(self._step)
        batch = next(self._it)
        self._step += 1
        return batch

    @property
    def step(self) -> int:
        """Batches yielded so far (the next batch is global step `step`)."""
        return self._step

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable; identical on every host (save it from one, or from all)."""
        return {"version": STATE_VERSION, "step": self._step,
                "fingerprint": self.config.fingerprint(self.num_units)}

    def set_state(self, state: dict[str, Any] | str | bytes):
        if isinstance(state, (str, bytes)):
            state = json.loads(state)
        want = json.loads(json.dumps(self.config.fingerprint(self.num_units)))
        got = state.get("fingerprint", {})
        if state.get("version") != STATE_VERSION or got != want:
            diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
            raise PipelineError(f"input pipeline state does not fit this pipeline: differs in {diff or ['version']} "
                                f"(saved {({k: got.get(k) for k in diff})}, now {({k: want.get(k) for k in diff})})")
        self.close()
        self._step = int(state["step"])

    def close(self):
        if self._it is not None and hasattr(self._it, "close"):
            self._it.close()
        self._it = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _absl_flags_parsed():
    """grain reads absl flags in its worker processes; unparsed flags there raise."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_pipeline(data_dir: str, name: str, tokenizer, config: PipelineConfig = PipelineConfig(), **kw):
    """`EditPairPipeline(open_dataset(data_dir, name), tokenizer, config)`."""
    return EditPairPipeline(open_dataset(data_dir, name), tokenizer, config, **kw)
