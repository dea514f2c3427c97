"""Edit masks as people have them: white = editable, black = kept, grey = partly (soft masks).

    m = load_mask("mask.png")                                 # 8-bit grayscale PIL ("L")
    m = fit_mask(m, photo.size, edit_image.size, mode="authors", name="mask.png")
    a = feather(m, blur=4)                                    # float32 (H, W) in [0, 1]

A mask may have any size with the image's aspect ratio; it is resized with the image (the same
crop and scale as ip2p_jax.images.resize_for_edit). Plain PIL/numpy, no JAX, so the CLI checks a
mask before any model is loaded.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from ip2p_jax.images import ImageError

ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
MAX_BLUR = 256          # feathering radius limit, in pixels


class MaskError(ImageError):
    """A mask that cannot be used; the message names the mask and says what to do."""


def load_mask(source, *, name: str | None = None) -> Image.Image:
    """A mask (file path, PIL image or array: HW / HW1 / HW3 of bool, uint8 or float in [0, 1])
    -> 8-bit grayscale PIL image. RGB masks are read by their luminance. Masks with alpha and
    16-bit or float images are refused with what to do instead."""
    if isinstance(source, (str, os.PathLike)):
        name = name or os.fspath(source)
        try:
            with Image.open(source) as im:
                im.load()
                im = ImageOps.exif_transpose(im)
        except FileNotFoundError:
            raise MaskError(f"{name}: no such mask file") from None
        except (Image.UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise MaskError(f"{name}: not a readable mask image ({e.__class__.__name__}: {e})") from None
        return _pil_mask(im, name)
    name = name or "mask"
    if isinstance(source, np.ndarray):
        return _array_mask(source, name)
    if isinstance(source, Image.Image):
        return _pil_mask(source, name)
    raise MaskError(f"{name}: expected a mask image (PIL), a numpy array or a file path, got {type(source).__name__}")


def _pil_mask(im: Image.Image, name: str) -> Image.Image:
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ALPHA_MODES or "transparency" in im.info:
        raise MaskError(f"{name}: the mask has an alpha channel ({im.mode}); save it as a grayscale image "
                        "(white = editable, black = kept), or pass its alpha as the mask: "
                        "mask.getchannel('A')")
    if im.mode in HIGH_DEPTH_MODES:
        raise MaskError(f"{name}: a {'16-bit' if im.mode.startswith('I;16') else im.mode + '-mode'} mask; save it "
                        "as an 8-bit grayscale image (white = editable, black = kept)")
    if im.mode not in ("1", "L", "RGB"):
        raise MaskError(f"{name}: a {im.mode} image is not a mask; use 8-bit grayscale (white = editable)")
    return im.convert("L")


def _array_mask(a: np.ndarray, name: str) -> Image.Image:
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 3 and a.shape[-1] == 4:
        raise MaskError(f"{name}: a 4-channel (RGBA) mask array; pass one channel (white = editable), "
                        "e.g. the alpha: array[..., 3]")
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] != 3) or min(a.shape[:2]) < 1:
        raise MaskError(f"{name}: array of shape {a.shape} is not a mask (HW, HW1 or HW3)")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)) or a.min() < 0 or a.max() > 1:
            raise MaskError(f"{name}: a float mask must hold values in [0, 1] (white = 1 = editable), "
                            f"got {np.nanmin(a):g}..{np.nanmax(a):g}")
        a = np.round(a * 255.0).astype(np.uint8)
    elif a.dtype == np.uint16:
        raise MaskError(f"{name}: a 16-bit mask array; pass uint8 (0..255), bool or float in [0, 1]")
    elif a.dtype != np.uint8:
        raise MaskError(f"{name}: a mask array of dtype {a.dtype}; pass uint8 (0..255), bool or float in [0, 1]")
    im = Image.fromarray(np.ascontiguousarray(a), "L" if a.ndim == 2 else "RGB")
    return im.convert("L")


def check_aspect(mask_size: tuple[int, int], image_size: tuple[int, int], name: str) -> None:
    """MaskError unless the mask has the image's aspect ratio (to within a pixel of either)."""
    (mw, mh), (w, h) = mask_size, image_size
    if abs(mw * h - mh * w) > max(w, h, mw, mh):
        raise MaskError(f"{name}: the mask is {mw}x{mh} but its image {w}x{h}: their aspect ratios differ; "
                        "a mask covers the whole image (resize or pad it to the image's shape)")


def fit_mask(mask: Image.Image, image_size: tuple[int, int], edit_size: tuple[int, int], *,
             mode: str = "authors", name: str = "mask") -> Image.Image:
    """The grayscale mask of an image of `image_size`, resized as resize_for_edit resizes that image
    to `edit_size`: "authors" crops to the edit aspect about the centre, "keep" scales."""
    check_aspect(mask.size, image_size, name)
    if mask.size == tuple(edit_size):
        return mask
    if mode == "authors":
        return ImageOps.fit(mask, tuple(edit_size), method=Image.Resampling.LANCZOS)
    return mask.resize(tuple(edit_size), Image.Resampling.LANCZOS)


def check_blur(blur) -> float:
    """The feathering radius as a float, or MaskError naming the setting."""
    try:
        v = float(blur)
    except (TypeError, ValueError):
        v = float("nan")
    if not 0 <= v <= MAX_BLUR:
        raise MaskError(f"mask_blur / --mask-blur must be a number of pixels from 0 to {MAX_BLUR}, got {blur!r}")
    return v


def feather(mask: Image.Image, blur: float = 0.0) -> np.ndarray:
    """The grayscale mask as float32 (H, W) in [0, 1], Gaussian-blurred by `blur` pixels (0: as is)."""
    if blur > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(radius=blur))
    return np.asarray(mask, np.float32) / 255.0
