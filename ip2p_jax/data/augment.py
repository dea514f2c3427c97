"""Decoding and the authors' joint augmentation of an (input, edited) image pair.

Authors (instruct-pix2pix `edit_dataset.py`): resize both images to a random square size
r in [min_resize, max_resize] (LANCZOS, aspect ratio not kept), then ONE random crop of
crop_size and ONE horizontal flip (p = flip_prob) applied to both; values 2 * x / 255 - 1.
Without augmentation both images are resized to crop_size (no crop, no flip).
`draft_decode` lets libjpeg decode JPEGs at 1/2, 1/4 or 1/8 scale (never below the resize
target) before that resize: ~3x less CPU for 512² sources and 256² crops, not bit-identical.
"""
from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image

from ip2p_jax.errors import Ip2pError


class AugmentError(Ip2pError):
    """Augmentation settings out of range (a config's data.augment)."""


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    min_resize: int = 256
    max_resize: int = 256
    crop_size: int = 256
    flip_prob: float = 0.5
    random: bool = True  # False: resize to crop_size only (validation / evaluation)
    draft_decode: bool = False  # faster JPEG decoding at reduced scale (see above)

    def __post_init__(self):
        if not 0 < self.crop_size <= self.min_resize <= self.max_resize:
            raise AugmentError(f"augmentation needs 0 < crop_size <= min_resize <= max_resize, got crop_size="
                             f"{self.crop_size}, min_resize={self.min_resize}, max_resize={self.max_resize}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise AugmentError(f"flip_prob must be in [0, 1], got {self.flip_prob}")


def decode_rgb(data: bytes, draft_size: int | None = None) -> Image.Image:
    """Encoded bytes -> RGB PIL image (grey, palette and alpha images converted). With
    `draft_size`, a JPEG may be decoded at a reduced scale, each side still >= draft_size."""
    im = Image.open(io.BytesIO(data))
    if draft_size and im.format == "JPEG":
        im.draft("RGB", (draft_size, draft_size))
    return im if im.mode == "RGB" else im.convert("RGB")


@dataclasses.dataclass(frozen=True)
class JointParams:
    """The random choices shared by both images of a pair."""
    size: int
    top: int
    left: int
    flip: bool


def draw_params(cfg: AugmentConfig, rng: np.random.Generator) -> JointParams:
    if not cfg.random:
        return JointParams(cfg.crop_size, 0, 0, False)
    size = int(rng.integers(cfg.min_resize, cfg.max_resize + 1))
    top = int(rng.integers(0, size - cfg.crop_size + 1))
    left = int(rng.integers(0, size - cfg.crop_size + 1))
    flip = bool(rng.random() < cfg.flip_prob)
    return JointParams(size, top, left, flip)


def apply_params(im: Image.Image, p: JointParams, crop_size: int) -> np.ndarray:
    """Resize, crop, flip one image -> uint8 (crop, crop, 3)."""
    if im.size != (p.size, p.size):
        im = im.resize((p.size, p.size), Image.Resampling.LANCZOS)
    x = np.asarray(im)[p.top:p.top + crop_size, p.left:p.left + crop_size]
    return x[:, ::-1] if p.flip else x


IMAGE_DTYPES = ("uint8", "float32")   # how batches carry images: raw 0..255, or to_float's [-1, 1]


def to_float(x):
    """uint8 [0, 255] -> float32 [-1, 1], as 2 * x / 255 - 1 (numpy or jax arrays: the train step
    applies it on the device to uint8 batches, so the host sends a quarter of the bytes)."""
    return x.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


def sdxl_time_ids(original_hw: tuple[int, int], p: JointParams, crop_size: int) -> np.ndarray:
    """SDXL's micro-conditioning of an example, float32 (6,): (original height, width) of the decoded
    image, the crop's top-left (top, left) in the resized image, the target size (crop, crop). A
    flipped example is, as in diffusers' SDXL scripts, a crop of the flipped image: left mirrors."""
    left = p.size - p.left - crop_size if p.flip else p.left
    return np.asarray([*original_hw, p.top, left, crop_size, crop_size], np.float32)


def image_size(data: bytes) -> tuple[int, int]:
    """(height, width) of encoded image bytes, from the header (before any draft decoding)."""
    width, height = Image.open(io.BytesIO(data)).size
    return height, width


def augment_pair(input_image: Image.Image, edited_image: Image.Image, cfg: AugmentConfig,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Both images with the same random resize, crop and flip -> two uint8 (crop, crop, 3) arrays."""
    p = draw_params(cfg, rng)
    return apply_params(input_image, p, cfg.crop_size), apply_params(edited_image, p, cfg.crop_size)
