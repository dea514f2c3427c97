"""The autoencoder's training images: random crops of renders of random shapes-world scenes.

`SceneCrops` is an endless, resumable iterator of {'image': float32 (B, crop, crop, 3) in [-1, 1]}:
crops (offsets on the 4-pixel latent grid, so crops are encoded in the same phase as whole
images) of a pool of renders that is partly re-rendered as it goes, with random h-flips. The
stream is a function of the seed alone; its state is the number of batches drawn (a resumed
stream replays the draws up to there, so it goes on exactly where it stopped).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from ip2p_jax.datagen.shapes.render import render_array
from ip2p_jax.datagen.shapes.world import Layout, sample_scene

RESOLUTION = 64
STATE_VERSION = 1


def random_scene_images(rng: np.random.Generator, n: int, resolution: int = RESOLUTION) -> np.ndarray:
    """uint8 (n, res, res, 3) renders of random placed scenes of the shapes world."""
    out = np.empty((n, resolution, resolution, 3), np.uint8)
    for i in range(n):
        scene = Layout.from_seed(int(rng.integers(2 ** 31))).place(sample_scene(rng))
        out[i] = render_array(scene, resolution)
    return out


def scene_crop_batches(seed: int, batch_size: int, crop: int = 32, pool: int = 1024,
                       refresh: int = 64) -> Iterator[np.ndarray]:
    """Endless float32 (batch_size, crop, crop, 3) batches in [-1, 1] (see the module doc)."""
    rng = np.random.default_rng([seed, 0xAE])
    images = random_scene_images(rng, pool)
    while True:
        images[rng.integers(pool, size=min(refresh, pool))] = random_scene_images(rng, min(refresh, pool))
        for _ in range(pool // batch_size):
            idx = rng.integers(pool, size=batch_size)
            ys = rng.integers(0, (RESOLUTION - crop) // 4 + 1, size=batch_size) * 4
            xs = rng.integers(0, (RESOLUTION - crop) // 4 + 1, size=batch_size) * 4
            b = np.stack([images[i, y:y + crop, x:x + crop] for i, y, x in zip(idx, ys, xs)])
            b = b.astype(np.float32) / 127.5 - 1.0
            flip = rng.random(batch_size) < 0.5
            b[flip] = b[flip, :, ::-1]
            yield b


class SceneCrops:
    """Host-local batches of scene crops: host h of H takes rows h, h + H, ... of each global batch."""

    def __init__(self, *, global_batch_size: int, seed: int = 0, crop: int = 32, pool: int = 0, refresh: int = 64,
                 process_index: int = 0, process_count: int = 1):
        self.settings = {"seed": seed, "global_batch_size": global_batch_size, "crop": crop,
                         "pool": pool or max(64, 16 * global_batch_size), "refresh": refresh}
        self.pi, self.pc = process_index, process_count
        self._restart(0)

    def _restart(self, drawn: int) -> None:
        s = self.settings
        self._it = scene_crop_batches(s["seed"], s["global_batch_size"], s["crop"], s["pool"], s["refresh"])
        for _ in range(drawn):
            next(self._it)
        self._drawn = drawn

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        self._drawn += 1
        return {"image": next(self._it)[self.pi::self.pc]}

    def get_state(self) -> dict:
        return {"version": STATE_VERSION, "batches": self._drawn, **self.settings}

    def set_state(self, state: dict) -> None:
        self._restart(int(state["batches"]))
