"""A deterministic in-memory edit-pair stream for smoke runs and tests (no dataset on disk).

Example i (a global index) is a coloured square on a coloured background; the instruction names a
new colour and the edited image has the square recoloured. Example content depends only on (seed,
i mod num_examples), so every host and every restart sees the same pairs; the iterator state is
the next batch number.
"""
from __future__ import annotations

import numpy as np

from ip2p_jax.data.augment import IMAGE_DTYPES, to_float
from ip2p_jax.errors import Ip2pError
from ip2p_jax.tokenizer import tokenize


class SyntheticDataError(Ip2pError):
    """A synthetic stream that cannot be split as asked."""


COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 70, 220), "white": (240, 240, 240),
           "black": (15, 15, 15)}


def synthetic_pair(seed: int, index: int, resolution: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(input uint8 HxWx3, edited uint8 HxWx3, instruction)."""
    rng = np.random.default_rng([seed, index])
    names = list(COLOURS)
    before, after = rng.choice(len(names), 2, replace=False)
    background = rng.integers(60, 200, 3)
    size = int(rng.integers(resolution // 4, resolution // 2 + 1))
    y, x = (int(v) for v in rng.integers(0, resolution - size + 1, 2))
    a = np.empty((resolution, resolution, 3), np.uint8)
    a[:] = background
    b = a.copy()
    a[y:y + size, x:x + size] = COLOURS[names[before]]
    b[y:y + size, x:x + size] = COLOURS[names[after]]
    return a, b, f"make the square {names[after]}"


class SyntheticPairs:
    """Iterator of host-local batches {'input_image', 'edited_image' (B,H,W,3), 'input_ids' (B,77)}
    (+ 'input_ids_2' from `tokenizer_2`, SDXL; the pairs are uncropped: no time ids): images uint8
    (the train step scales them on the device) or, with image_dtype="float32", in [-1, 1].

    Batch n on process p holds global examples n * global_batch + p * local_batch + [0, local_batch).
    """

    def __init__(self, tokenizer, *, resolution: int, global_batch_size: int, seed: int = 0,
                 num_examples: int = 0, process_index: int = 0, process_count: int = 1, tokenizer_2=None,
                 image_dtype: str = "uint8"):
        if image_dtype not in IMAGE_DTYPES:
            raise SyntheticDataError(f"image_dtype must be one of {IMAGE_DTYPES}, got {image_dtype!r}")
        if global_batch_size % process_count:
            raise SyntheticDataError(f"global batch {global_batch_size} does not split over {process_count} processes")
        self.local = global_batch_size // process_count
        self.global_batch, self.offset = global_batch_size, process_index * self.local
        self.resolution, self.seed, self.num_examples = resolution, seed, num_examples
        self._tokenize = lambda texts: tokenize(tokenizer, texts)
        self._tokenize_2 = None if tokenizer_2 is None else (lambda texts: tokenize(tokenizer_2, texts))
        self._next = 0
        self._images = (lambda x: x) if image_dtype == "uint8" else to_float

    def __iter__(self):
        return self

    def example(self, index: int):
        if self.num_examples:
            index %= self.num_examples
        return synthetic_pair(self.seed, index, self.resolution)

    def __next__(self) -> dict:
        start = self._next * self.global_batch + self.offset
        pairs = [self.example(i) for i in range(start, start + self.local)]
        self._next += 1
        out = {"input_image": self._images(np.stack([p[0] for p in pairs])),
               "edited_image": self._images(np.stack([p[1] for p in pairs])),
               "input_ids": self._tokenize([p[2] for p in pairs])}
        if self._tokenize_2 is not None:
            out["input_ids_2"] = self._tokenize_2([p[2] for p in pairs])
        return out

    def get_state(self) -> dict:
        return {"next_batch": self._next}

    def set_state(self, state: dict) -> None:
        self._next = int(state["next_batch"])
