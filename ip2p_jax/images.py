"""Images as people really have them: loading, normalising to RGB, resize rules, grids.

Everything here is plain PIL/numpy (no JAX), so the CLI can read and check all inputs
before any model is loaded.
"""
from __future__ import annotations

import glob
import math
import os
import warnings
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from ip2p_jax.errors import Ip2pError

# Larger inputs are refused before decoding (50 MP is about 8700 x 5800).
DEFAULT_MAX_PIXELS = 50_000_000
# An image whose short side is below this is upscaled to it (with a warning) before editing.
MIN_SIDE = 16
# The model-side size `resize="keep"` may produce; beyond it memory and time explode.
DEFAULT_MAX_EDIT_PIXELS = 2048 * 2048
RESIZE_MODES = ("authors", "keep")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")


class ImageError(Ip2pError):
    """An input image cannot be used; the message names the file (or item) and the problem."""


# ---------------------------------------------------------------- loading and normalising

def load_image(path: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read an image file as upright 8-bit RGB (EXIF rotation applied, alpha on white).

    The size is checked against `max_pixels` from the header, before any pixel is decoded
    (this limit replaces Pillow's decompression-bomb check)."""
    prev = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        try:
            im = Image.open(path)
        except FileNotFoundError:
            raise ImageError(f"{path}: no such file") from None
        except IsADirectoryError:
            raise ImageError(f"{path}: is a directory, not an image") from None
        except (Image.UnidentifiedImageError, OSError) as e:
            raise ImageError(f"{path}: not a readable image ({e.__class__.__name__}: {e})") from None
        with im:
            check_pixels(im.size, max_pixels, name=path)
            try:
                im.load()
                return to_rgb(im, name=path)
            except ImageError:
                raise
            except (OSError, ValueError, SyntaxError) as e:  # truncated / corrupt data
                raise ImageError(f"{path}: cannot decode image ({e.__class__.__name__}: {e})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = prev


def probe_size(source, *, name: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """The upright (width, height) of an image file (a path or a binary file object) from its
    header alone, no pixel decoded: inputs are checked up front and decoded only when needed."""
    name = name or os.fspath(source) if isinstance(source, (str, os.PathLike)) else (name or "image")
    prev = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(source) as im:
            w, h = im.size
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):   # EXIF rotation by 90 degrees
                w, h = h, w
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{name}: is a directory, not an image") from None
    except (Image.UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"{name}: not a readable image ({e.__class__.__name__}: {e})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = prev
    check_pixels((w, h), max_pixels, name=name)
    return w, h


def check_pixels(size: tuple[int, int], max_pixels: int, *, name: str = "image",
                 setting: str = "max_pixels / --max-pixels") -> None:
    """ImageError naming the size, the limit and the `setting` that raises it, if over the limit."""
    w, h = size
    if w * h > max_pixels:
        raise ImageError(f"{name}: {w}x{h} = {w * h / 1e6:.1f} MP is over the limit of "
                         f"{max_pixels / 1e6:.1f} MP (raise it with {setting})")


def to_rgb(image, *, name: str = "image") -> Image.Image:
    """Any PIL image or array (HW, HWC with 1-4 channels; uint8, uint16, bool or float in [0, 1])
    -> upright 8-bit RGB PIL image. Transparency is composited on white."""
    if isinstance(image, np.ndarray):
        image = _array_to_pil(image, name)
    if not isinstance(image, Image.Image):
        raise ImageError(f"{name}: expected a PIL image, a numpy array or a file path, got {type(image).__name__}")
    im = ImageOps.exif_transpose(image)
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        im = _high_depth_to_l(im)
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("LA", "PA", "La", "RGBa") or (im.mode == "L" and "transparency" in im.info):
        im = im.convert("RGBA")
    if im.mode == "RGB" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    if im.mode != "RGB":  # L, 1, CMYK, YCbCr, LAB, HSV
        im = im.convert("RGB")
    return im


def _high_depth_to_l(im: Image.Image) -> Image.Image:
    a = np.asarray(im)
    if im.mode == "F":
        a = a.astype(np.float64)
        top = 1.0 if a.max(initial=0) <= 1.0 else 255.0
        a = a / top * 255.0
    else:  # "I;16*" is 16-bit by definition; "I" (32-bit) holds 8- or 16-bit data in practice
        a = a.astype(np.float64)
        top = 255.0 if im.mode == "I" and a.max(initial=0) <= 255 else 65535.0
        a = a / top * 255.0
    return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")


def _array_to_pil(a: np.ndarray, name: str) -> Image.Image:
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise ImageError(f"{name}: array of shape {a.shape} is not an image (HW or HWC with 1, 3 or 4 channels)")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16:
        a = np.round(a / 257.0).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)):
            raise ImageError(f"{name}: float image contains NaN or inf")
        a = np.round(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
    elif a.dtype != np.uint8:
        if a.min(initial=0) < 0 or a.max(initial=0) > 255:
            raise ImageError(f"{name}: integer image of dtype {a.dtype} has values outside 0..255")
        a = a.astype(np.uint8)
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[a.shape[-1] if a.ndim == 3 else 2]
    return Image.fromarray(np.ascontiguousarray(a), mode)


def expand_paths(specs: Iterable[str]) -> list[str]:
    """Files, folders (their images, sorted, not recursive) and glob patterns -> file paths.

    A spec matching nothing is kept as given, so loading it reports the problem by name.
    """
    out: list[str] = []
    for spec in specs:
        if os.path.isdir(spec):
            names = sorted(n for n in os.listdir(spec) if not n.startswith("."))
            out += [os.path.join(spec, n) for n in names
                    if os.path.isfile(os.path.join(spec, n)) and n.lower().endswith(IMAGE_EXTENSIONS)]
        elif any(c in spec for c in "*?[") and not os.path.exists(spec):
            matches = sorted(glob.glob(spec, recursive=True))
            out += matches if matches else [spec]
        else:
            out.append(spec)
    return list(dict.fromkeys(out))


# ---------------------------------------------------------------- resize rules

def authors_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The authors' rule: scale so the long side is about `resolution`, round the short side
    up to a multiple of 64 and floor both sides to multiples of 64. Returns (width, height)."""
    short = min(width, height)
    factor = resolution / max(width, height)
    factor = math.ceil(short * factor / 64) * 64 / short
    return max(64, int(width * factor // 64) * 64), max(64, int(height * factor // 64) * 64)


def keep_size(width: int, height: int) -> tuple[int, int]:
    """diffusers' rule: floor each side to a multiple of 8 (the VAE's factor)."""
    return max(8, width // 8 * 8), max(8, height // 8 * 8)


def _tiny_upscaled(w: int, h: int) -> tuple[int, int]:
    f = MIN_SIDE / min(w, h)
    return max(MIN_SIDE, round(w * f)), max(MIN_SIDE, round(h * f))


def edit_size(size: tuple[int, int], *, mode: str = "authors", resolution: int = 512, name: str = "image",
              max_edit_pixels: int = DEFAULT_MAX_EDIT_PIXELS) -> tuple[int, int]:
    """The (width, height) `resize_for_edit` gives an image of `size`; ImageError if over the limit."""
    if mode not in RESIZE_MODES:
        raise ImageError(f"resize must be one of {RESIZE_MODES}, got {mode!r}")
    w, h = size
    if min(w, h) < MIN_SIDE:
        w, h = _tiny_upscaled(w, h)
    if mode == "authors":
        out = authors_size(w, h, resolution)
        check_pixels(out, max_edit_pixels, name=f"{name} (resized for editing)",
                     setting="max_edit_pixels / --max-edit-pixels, or lower the resolution")
        return out
    out = keep_size(w, h)
    if out[0] * out[1] > max_edit_pixels:
        raise ImageError(f"{name}: {out[0]}x{out[1]} is too large to edit at full size (limit "
                         f"{max_edit_pixels / 1e6:.1f} MP); use resize='authors' with a resolution, "
                         f"or raise max_edit_pixels / --max-edit-pixels")
    return out


def resize_for_edit(image: Image.Image, *, mode: str = "authors", resolution: int = 512,
                    name: str = "image", max_edit_pixels: int = DEFAULT_MAX_EDIT_PIXELS) -> Image.Image:
    """RGB image -> the image the model edits (sides multiples of 8; of 64 for "authors").

    "authors": centre-fit (crop to aspect, LANCZOS) to `authors_size`.
    "keep": LANCZOS-resize to `keep_size` (a no-op when the sides are already multiples of 8).
    An image with a side under MIN_SIDE pixels is first upscaled, with a warning.
    """
    size = edit_size(image.size, mode=mode, resolution=resolution, name=name, max_edit_pixels=max_edit_pixels)
    w, h = image.size
    if min(w, h) < MIN_SIDE:
        nw, nh = _tiny_upscaled(w, h)
        warnings.warn(f"{name}: {w}x{h} is tiny; upscaled to {nw}x{nh} before editing (expect a blurry result)",
                      stacklevel=2)
        image = image.resize((nw, nh), Image.Resampling.LANCZOS)
    if size == image.size:
        return image
    if mode == "authors":
        return ImageOps.fit(image, size, method=Image.Resampling.LANCZOS)
    return image.resize(size, Image.Resampling.LANCZOS)


def to_model_array(image: Image.Image) -> np.ndarray:
    """RGB PIL -> float32 HWC in [-1, 1]."""
    return np.asarray(image, dtype=np.float32) / 127.5 - 1.0


def from_unit_array(x: np.ndarray) -> Image.Image:
    """float HWC in [0, 1] -> 8-bit RGB PIL (rounded as diffusers' numpy_to_pil does)."""
    return Image.fromarray((np.clip(x, 0.0, 1.0) * 255.0).round().astype(np.uint8), "RGB")


# ---------------------------------------------------------------- comparison grid

def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def make_grid(cells: Sequence[Sequence[Image.Image]], row_labels: Sequence[str], col_labels: Sequence[str],
              *, title: str | None = None, row_title: str = "", col_title: str = "") -> Image.Image:
    """Labelled grid: cells[r][c]; column labels on top, row labels on the left (the paper's
    guidance figure: rows image scale, columns text scale)."""
    rows, cols = len(cells), len(cells[0]) if cells else 0
    if rows == 0 or cols == 0 or any(len(r) != cols for r in cells):
        raise ValueError("make_grid needs a non-empty rectangular list of rows")
    if len(row_labels) != rows or len(col_labels) != cols:
        raise ValueError(f"make_grid: {rows}x{cols} cells but {len(row_labels)} row and {len(col_labels)} column labels")
    cw = max(im.width for r in cells for im in r)
    ch = max(im.height for r in cells for im in r)
    fs = max(12, min(cw, ch) // 16)
    font, pad = _font(fs), fs // 2
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_w(s):
        box = probe.textbbox((0, 0), s, font=font)
        return box[2] - box[0]

    left = max([text_w(s) for s in list(row_labels) + [row_title]] + [0]) + 2 * pad
    line = fs + 2 * pad
    top = line * (1 + bool(col_title) + bool(title))
    grid = Image.new("RGB", (left + cols * cw, top + rows * ch), "white")
    draw = ImageDraw.Draw(grid)
    y = pad
    if title:
        draw.text((pad, y), title, fill="black", font=font)
        y += line
    if col_title:
        draw.text((left, y), col_title, fill="black", font=font)
        y += line
    if row_title:
        draw.text((pad, y), row_title, fill="black", font=font)
    for c, s in enumerate(col_labels):
        draw.text((left + c * cw + (cw - text_w(s)) // 2, y), s, fill="black", font=font)
    for r, row in enumerate(cells):
        draw.text((pad, top + r * ch + ch // 2 - fs // 2), row_labels[r], fill="black", font=font)
        for c, im in enumerate(row):
            grid.paste(im, (left + c * cw, top + r * ch))
    return grid
