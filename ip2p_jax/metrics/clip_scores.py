"""The paper's CLIP metrics for edits, with the project's Flax CLIP.

    scorer = ClipScorer.from_pretrained("clip-vit-large-patch14")   # a transformers CLIPModel folder
    s = scorer.scores(input_images, edited_images, input_captions, edited_captions)
    mean_scores(s)   # {"sim_direction": ..., "sim_image": ..., "sim_0": ..., "sim_1": ...}

Per example (as the authors' metrics/clip_similarity.py, on unit-normalised embeddings):
  sim_0          cos(image(input), text(input caption))
  sim_1          cos(image(edited), text(edited caption))
  sim_direction  cos(image(edited) - image(input), text(edited caption) - text(input caption))
  sim_image      cos(image(input), image(edited))

Images are preprocessed as transformers' `CLIPImageProcessor` with its PIL backend
(`CLIPImageProcessorPil`, what transformers 5 uses when torchvision is absent, and what the
`CLIPImageProcessor` of transformers 4 did): RGB (alpha composited on white), PIL resize of the
uint8 image so the shortest side is `size` (long side floored), center crop (zero padding if
needed), x * (1/255) in float64 then float32, (x - mean) / std in float32. The authors' own
script differs: it squashes the whole image to 224x224 (torch bicubic, no crop).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from ip2p_jax import placement, sharding
from ip2p_jax.errors import Ip2pError
from ip2p_jax.models.clip import CLIPModel
from ip2p_jax.tokenizer import tokenize
from ip2p_jax.weights.clip import ClipModelError, load_clip_model
from ip2p_jax.weights.io import read_json

METRICS = ("sim_direction", "sim_image", "sim_0", "sim_1")
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_BATCH_SIZE = 32
_EPS = 1e-8   # torch.nn.functional.cosine_similarity's default


# ---------------------------------------------------------------------------- preprocessing

@dataclasses.dataclass(frozen=True)
class ClipImageProcessor:
    """transformers' CLIPImageProcessor (PIL backend) in numpy/PIL. `size`: ("shortest_edge", n)
    or ("hw", (h, w)); `crop`: (h, w) or None."""

    size: tuple = ("shortest_edge", 224)
    crop: tuple | None = (224, 224)
    resample: int = 3                      # PIL.Image.BICUBIC
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    mean: tuple = OPENAI_CLIP_MEAN
    std: tuple = OPENAI_CLIP_STD

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "preprocessor config") -> "ClipImageProcessor":
        """From a `preprocessor_config.json` dict (old files store `size: 224, crop_size: 224`)."""
        def fail(msg):
            raise ClipModelError(f"{source}: {msg}")

        size = d.get("size", {"shortest_edge": 224})
        if isinstance(size, int):
            size = {"shortest_edge": size}
        if not isinstance(size, Mapping):
            fail(f"size={size!r} is not an int or a dict")
        if set(size) == {"shortest_edge"}:
            size_rule = ("shortest_edge", int(size["shortest_edge"]))
        elif set(size) == {"height", "width"}:
            size_rule = ("hw", (int(size["height"]), int(size["width"])))
        else:
            fail(f"unsupported size={dict(size)!r} (supported: shortest_edge, or height and width)")
        crop = d.get("crop_size", {"height": 224, "width": 224})
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        if not isinstance(crop, Mapping) or set(crop) != {"height", "width"}:
            fail(f"unsupported crop_size={crop!r} (expected an int or height and width)")
        unsupported = [k for k in ("do_pad", "do_flip_channel_order") if d.get(k)]
        if d.get("do_convert_rgb") is False:
            unsupported.append("do_convert_rgb=false")
        if unsupported:
            fail(f"unsupported settings: {', '.join(unsupported)}")
        mean, std = tuple(d.get("image_mean", OPENAI_CLIP_MEAN)), tuple(d.get("image_std", OPENAI_CLIP_STD))
        if len(mean) != 3 or len(std) != 3:
            fail(f"image_mean / image_std must have 3 values, got {mean!r} / {std!r}")
        return cls(size=size_rule, crop=(int(crop["height"]), int(crop["width"])) if d.get("do_center_crop", True)
                   else None, resample=int(d.get("resample", 3)), do_resize=bool(d.get("do_resize", True)),
                   do_rescale=bool(d.get("do_rescale", True)), rescale_factor=float(d.get("rescale_factor", 1 / 255)),
                   do_normalize=bool(d.get("do_normalize", True)), mean=mean, std=std)

    @classmethod
    def default(cls, image_size: int) -> "ClipImageProcessor":
        return cls(size=("shortest_edge", image_size), crop=(image_size, image_size))

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        if self.crop is not None:
            return self.crop
        return self.resize_size(h, w) if self.do_resize else (h, w)

    def resize_size(self, h: int, w: int) -> tuple[int, int]:
        """(h, w) after the resize: transformers' get_resize_output_image_size(default_to_square=False)."""
        kind, value = self.size
        if kind == "hw":
            return value
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = value, int(value * long / short)
        return (new_long, new_short) if w <= h else (new_short, new_long)

    def __call__(self, image, *, name: str = "image") -> np.ndarray:
        """One image (PIL, or uint8 array HW / HWC with 3 channels) -> float32 (H, W, 3) NHWC pixels."""
        x = to_rgb_uint8(image, name=name)
        if self.do_resize:
            h, w = self.resize_size(*x.shape[:2])
            x = np.asarray(Image.fromarray(x).resize((w, h), resample=self.resample))
        if self.crop is not None:
            x = _center_crop(x, *self.crop)
        x = x.astype(np.float64) * self.rescale_factor if self.do_rescale else x
        x = x.astype(np.float32)
        if self.do_normalize:
            x = (x - np.array(self.mean, np.float32)) / np.array(self.std, np.float32)
        return x


def to_rgb_uint8(image, *, name: str = "image") -> np.ndarray:
    """PIL image (any mode; alpha composited on white, as transformers does) or uint8 array
    (HW, HW1 or HW3) -> uint8 (H, W, 3)."""
    if isinstance(image, Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        return np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"{name}: expected a uint8 array, got dtype {image.dtype} (convert floats in "
                             "[0, 1] with np.round(x * 255).astype(np.uint8))")
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3 or image.shape[-1] not in (1, 3) or 0 in image.shape:
            raise ValueError(f"{name}: expected an (H, W, 3) or (H, W) image array, got shape {image.shape}")
        return np.ascontiguousarray(np.broadcast_to(image, image.shape[:2] + (3,)))
    raise ValueError(f"{name}: expected a PIL image or a uint8 numpy array, got {type(image).__name__}")


def _center_crop(x: np.ndarray, ch: int, cw: int) -> np.ndarray:
    """transformers' center_crop on HWC: offsets floor((size - crop) / 2); a smaller image is
    first zero-padded (ceil of half the missing rows / columns on top / left)."""
    h, w = x.shape[:2]
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0:
        return x[top:top + ch, left:left + cw]
    nh, nw = max(h, ch), max(w, cw)
    pt, pl = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
    padded = np.zeros((nh, nw) + x.shape[2:], x.dtype)
    padded[pt:pt + h, pl:pl + w] = x
    top, left = top + pt, left + pl
    return padded[max(0, top):min(nh, top + ch), max(0, left):min(nw, left + cw)]


# ---------------------------------------------------------------------------- metrics

def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), _EPS)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(_unit(a) * _unit(b), axis=-1)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of (N, D) features (float64; torch's eps for zero rows)."""
    return _cos(a, b)


def scores_from_features(image_0, image_1, text_0, text_1) -> dict[str, np.ndarray]:
    """The four per-example metrics from (N, D) CLIP features (normalised here; float32 out)."""
    i0, i1, t0, t1 = (_unit(x) for x in (image_0, image_1, text_0, text_1))
    out = {"sim_direction": _cos(i1 - i0, t1 - t0), "sim_image": _cos(i0, i1),
           "sim_0": _cos(i0, t0), "sim_1": _cos(i1, t1)}
    return {k: v.astype(np.float32) for k, v in out.items()}


def mean_scores(scores: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """Means over examples of each metric present, in METRICS order (plus `num`, the example count)."""
    present = [m for m in METRICS if m in scores]
    if not present:
        raise ValueError(f"no CLIP metrics among {sorted(scores)} (expected {', '.join(METRICS)})")
    n = len(np.asarray(scores[present[0]]))
    if n == 0:
        raise ValueError("no examples to average")
    out = {m: float(np.mean(np.asarray(scores[m], np.float64))) for m in present}
    out["num"] = n
    return out


# ---------------------------------------------------------------------------- model

def load_clip_folder(path: str, *, dtype=np.float32):
    """A transformers CLIPModel folder (config.json, model.safetensors or pytorch_model.bin,
    tokenizer files, optional preprocessor_config.json) -> (CLIPConfig, params, tokenizer, processor)."""
    config, params, tokenizer = load_clip_model(path, dtype=dtype)
    path = os.fspath(path)
    proc_path = os.path.join(path, "preprocessor_config.json")
    try:
        processor = (ClipImageProcessor.from_dict(read_json(proc_path), source=proc_path)
                     if os.path.isfile(proc_path) else ClipImageProcessor.default(config.vision_config.image_size))
    except ClipModelError:
        raise
    except Ip2pError as e:   # unreadable JSON: it names the file
        raise ClipModelError(f"{path}: cannot load the CLIP model: {e}") from None
    side = config.vision_config.image_size
    if processor.crop is not None and processor.crop != (side, side):
        raise ClipModelError(f"{path}: preprocessor_config.json crops to {processor.crop[0]}x{processor.crop[1]} "
                             f"but the vision model takes {side}x{side}")
    return config, params, tokenizer, processor


def _features_function(model: CLIPModel, method: str):
    return jax.jit(lambda p, x: model.apply({"params": p}, x, method=getattr(model, method)))


class ClipScorer:
    """CLIP image/text features (jitted, one compile per batch shape) and the edit metrics."""

    def __init__(self, config, params, tokenizer, processor: ClipImageProcessor, *, dtype=jnp.float32,
                 batch_size: int = DEFAULT_BATCH_SIZE, attention_impl: str = "auto", source: str = ""):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self.config, self.tokenizer, self.processor, self.source = config, tokenizer, processor, source
        self.batch_size = int(batch_size)
        self.dtype = jnp.dtype(dtype)
        self.model = CLIPModel(config, dtype=self.dtype, attention_impl=attention_impl)
        self.params = placement.place_params(params, self.dtype)
        # Per scorer (not placement.compiled): its batch size fixes the shapes it compiles.
        self._image_jit = _features_function(self.model, "get_image_features")
        self._text_jit = _features_function(self.model, "get_text_features")

    @classmethod
    def from_pretrained(cls, path: str, *, dtype=jnp.float32, batch_size: int = DEFAULT_BATCH_SIZE,
                        attention_impl: str = "auto") -> "ClipScorer":
        """Load a transformers CLIPModel folder (e.g. a copy of openai/clip-vit-large-patch14)."""
        config, params, tokenizer, processor = load_clip_folder(path, dtype=np.dtype(jnp.dtype(dtype)))
        return cls(config, params, tokenizer, processor, dtype=dtype, batch_size=batch_size,
                   attention_impl=attention_impl, source=os.fspath(path))

    def preprocess(self, images: Sequence, *, names: Sequence[str] | None = None) -> np.ndarray:
        """Images -> float32 (N, S, S, 3) model pixels."""
        images = list(images)
        names = list(names) if names is not None else [f"image {i}" for i in range(len(images))]
        side = self.config.vision_config.image_size
        out = np.empty((len(images), side, side, 3), np.float32)
        for i, (im, name) in enumerate(zip(images, names)):
            px = self.processor(im, name=name)
            if px.shape != (side, side, 3):
                raise ValueError(f"{name}: preprocessed to {px.shape[0]}x{px.shape[1]}, the CLIP model takes "
                                 f"{side}x{side} (check preprocessor_config.json)")
            out[i] = px
        return out

    def _batched(self, fn, rows: np.ndarray) -> np.ndarray:
        n = len(rows)
        if n == 0:
            return np.zeros((0, self.config.projection_dim), np.float32)
        size = min(self.batch_size, sharding.bucket_size(n))
        outs = []
        for start in range(0, n, size):
            chunk = sharding.pad_rows(rows[start:start + size], size)   # every call has one shape
            outs.append(np.asarray(fn(self.params, chunk))[:n - start])
        return np.concatenate(outs).astype(np.float32)

    def image_features(self, images: Sequence, *, names: Sequence[str] | None = None) -> np.ndarray:
        """(N, projection_dim) float32 image features (not normalised), as transformers'
        CLIPModel.get_image_features after CLIPImageProcessor."""
        return self._batched(self._image_jit, self.preprocess(images, names=names))

    def text_features(self, texts: Sequence[str]) -> np.ndarray:
        """(N, projection_dim) float32 text features (not normalised); texts over the model's
        length are truncated (with a warning)."""
        texts = list(texts)
        if any(not isinstance(t, str) for t in texts):
            raise ValueError("captions must be strings")
        ids = tokenize(self.tokenizer, texts, max_length=self.config.text_config.max_position_embeddings)
        return self._batched(self._text_jit, ids)

    def scores(self, input_images: Sequence, edited_images: Sequence, input_captions: Sequence[str],
               edited_captions: Sequence[str]) -> dict[str, np.ndarray]:
        """Per-example sim_direction, sim_image, sim_0, sim_1: float32 arrays of length N."""
        lists = [list(x) for x in (input_images, edited_images, input_captions, edited_captions)]
        counts = [len(x) for x in lists]
        if len(set(counts)) != 1:
            raise ValueError(f"scores needs as many of each: got {counts[0]} input images, {counts[1]} edited "
                             f"images, {counts[2]} input captions, {counts[3]} edited captions")
        i0 = self.image_features(lists[0], names=[f"input image {i}" for i in range(counts[0])])
        i1 = self.image_features(lists[1], names=[f"edited image {i}" for i in range(counts[1])])
        t = self.text_features(lists[2] + lists[3])
        return scores_from_features(i0, i1, t[:counts[0]], t[counts[0]:])
