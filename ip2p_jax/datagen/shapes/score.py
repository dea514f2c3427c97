"""Judging an edited image against the shapes world's ground truth.

Every judgement reads colours as the nearest palette colour and uses the
renderer's known geometry (coverage masks, slots) of the example's scenes:

- recolor:    median colour of the object's interior is the asked colour.
- background: median colour of the pixels no object touches (in input or
              output, 1 px margin) is the asked colour.
- remove:     median colour of the removed object's interior is the background.
- resize:     pixels of the object's colour in its slot, counted and
              compared with the ideal areas of its shape small and large (nearest
              in log-area; far below small or far above large = neither); the
              size class must be the asked one.
- shape:      the largest blob of the object's colour in its slot is compared
              (IoU, +-1 px search) with a template of every shape fitted to the
              blob's area and centroid; the best (IoU >= 0.5) must be the asked shape.
- add:        the new object may appear ANYWHERE outside the input objects'
              slots: the largest connected blob of the asked colour there must
              have the asked size class and shape (same tests as above). The
              place the ground truth gives it comes from the image seed, which
              the instruction does not carry, so demanding it would cap a
              perfect editor at ~1/(free cells).

``psnr_unchanged``: PSNR against the expected output over the pixels where the
input and expected-output renders agree, eroded by 1 px (for add, minus the
detected blob's box + 2 px); capped at 100 dB (identical pixels), NaN if empty.
``preserved``: every object the edit leaves alone (and the background, unless
it is the edit) still reads as its colour.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable, Optional

import numpy as np
from PIL import Image
from scipy import ndimage

from .pairs import Example
from .render import coverage, shape_coverage, shape_moments, slot_mask
from .world import COLORS, EDIT_TYPES, HALF_SIZE, PALETTE, SHAPES, SIZES, Obj

PSNR_CAP = 100.0
MIN_SHAPE_IOU = 0.5
_PALETTE = np.array([PALETTE[c] for c in COLORS], dtype=np.float32)
_EIGHT = np.ones((3, 3), bool)


def to_array(image, resolution: int) -> np.ndarray:
    """PIL image or HxWx3 array (uint8, or float in [0, 1]) -> uint8 (res, res, 3)."""
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
    else:
        a = np.asarray(image)
        if a.ndim != 3 or a.shape[-1] != 3:
            raise ValueError(f"an edited image must be HxWx3, got shape {a.shape}")
        if a.dtype != np.uint8:
            a = np.clip(np.rint(a.astype(np.float32) * 255), 0, 255).astype(np.uint8)
        image = Image.fromarray(a)
    if image.size != (resolution, resolution):
        shrink = image.size[0] > resolution
        image = image.resize((resolution, resolution), Image.BOX if shrink else Image.BICUBIC)
    return np.asarray(image)


def color_labels(img: np.ndarray) -> np.ndarray:
    """Index into COLORS of each pixel's nearest palette colour."""
    # argmin_p |x - p|^2 = argmin_p (|p|^2 - 2 x.p)
    score = (_PALETTE**2).sum(-1) - 2 * img.reshape(-1, 3).astype(np.float32) @ _PALETTE.T
    return score.argmin(-1).reshape(img.shape[:2])


def region_color(img: np.ndarray, mask: np.ndarray) -> Optional[str]:
    """Nearest palette colour of the per-channel median over ``mask`` (None if empty)."""
    if not mask.any():
        return None
    med = np.median(img[mask].astype(np.float32), axis=0)
    return COLORS[int(((_PALETTE - med) ** 2).sum(-1).argmin())]


def interior(o: Obj, resolution: int) -> np.ndarray:
    cov = coverage(o, resolution)
    full = cov >= 0.999
    return full if full.any() else cov >= 0.5


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(mask)
    h, w = mask.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        mask[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def _bbox_slice(mask: np.ndarray, margin: int = 0):
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    return np.s_[max(ys.min() - margin, 0):min(ys.max() + 1 + margin, h),
                 max(xs.min() - margin, 0):min(xs.max() + 1 + margin, w)]


def classify_shape(mask: np.ndarray) -> tuple[Optional[str], float]:
    """Best-matching shape of a blob and its IoU. Each shape's template is fitted to
    the blob's area and centroid (size is judged separately, by area; moments are
    robust to ragged edges) and compared with +-1 px shifts; (None, iou) when even
    the best IoU is below MIN_SHAPE_IOU."""
    if not mask.any():
        return None, 0.0
    mask = mask[_bbox_slice(mask, margin=3)]
    ys, xs = np.nonzero(mask)
    area, my, mx = float(len(xs)), ys.mean() + 0.5, xs.mean() + 0.5  # pixel centres
    best, best_iou = None, 0.0
    for shape in SHAPES:
        unit_area, ux, uy = shape_moments(shape)
        h = math.sqrt(area / unit_area)
        side = max(mask.shape)
        template = shape_coverage(shape, mx - ux * h, my - uy * h, h, side)[:mask.shape[0], :mask.shape[1]] >= 0.5
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                t = _shift(template, dy, dx)
                iou = (t & mask).sum() / max((t | mask).sum(), 1)
                if iou > best_iou:
                    best, best_iou = shape, float(iou)
    return (best if best_iou >= MIN_SHAPE_IOU else None), best_iou


def size_class(area: float, shape: str, resolution: int) -> Optional[str]:
    """'small'/'large' by nearest ideal area (pixels) in log scale; None if implausible."""
    ideal = {s: shape_moments(shape)[0] * (HALF_SIZE[s] * resolution) ** 2 for s in SIZES}
    if area < 0.4 * ideal["small"] or area > 2.0 * ideal["large"]:
        return None
    return min(SIZES, key=lambda s: abs(math.log(area / ideal[s])))


def _psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    if not mask.any():
        return float("nan")
    d = a.astype(np.float32) - b.astype(np.float32)
    mse = float((d * d).sum(-1)[mask].sum(dtype=np.float64) / (3 * mask.sum()))
    return PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * math.log10(255.0**2 / mse))


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    comps, n = ndimage.label(mask, structure=_EIGHT)
    if n <= 1:
        return mask
    sizes = ndimage.sum_labels(np.ones_like(comps), comps, index=np.arange(1, n + 1))
    return comps == (1 + int(np.argmax(sizes)))


def _find_added(example: Example, img, new: Obj):
    res = example.resolution
    free = np.ones((res, res), bool)
    for o in example.input_scene.objects:
        free &= ~slot_mask(o, res)
    blob = _largest_blob((color_labels(img) == COLORS.index(new.color)) & free)
    if not blob.any():
        return None, None, None, None
    return blob, new.color, size_class(float(blob.sum()), new.shape, res), classify_shape(blob)[0]


def score_edit(example: Example, edited_image) -> dict:
    """Judge one edited image: dict(success, edit_type, psnr_unchanged, expected,
    found, preserved)."""
    res = example.resolution
    img = to_array(edited_image, res)
    edit = example.edit
    before, after = example.input_scene, example.output_scene
    exclude = None  # extra pixels to leave out of the unchanged-region PSNR

    if edit.type == "background":
        touched = np.zeros((res, res), bool)
        for o in before.objects + after.objects:
            touched |= coverage(o, res) > 0
        touched = ndimage.binary_dilation(touched, structure=_EIGHT)
        expected, found = edit.value, region_color(img, ~touched)
    elif edit.type == "add":
        blob, color, size, shape = _find_added(example, img, edit.value)
        expected = f"{edit.value.size} {edit.value.color} {edit.value.shape}"
        found = None if blob is None else f"{size} {color} {shape}"
        if blob is not None:
            ys, xs = np.nonzero(blob)
            exclude = np.zeros((res, res), bool)
            exclude[max(ys.min() - 2, 0):ys.max() + 3, max(xs.min() - 2, 0):xs.max() + 3] = True
    else:
        obj = before.objects[edit.index]
        if edit.type == "recolor":
            expected, found = edit.value, region_color(img, interior(obj, res))
        elif edit.type == "remove":
            expected, found = after.background, region_color(img, interior(obj, res))
        else:
            slot = slot_mask(obj, res)
            box = _bbox_slice(slot)
            mine = np.zeros_like(slot)
            mine[box] = color_labels(img[box]) == COLORS.index(obj.color)
            if edit.type == "resize":
                expected, found = edit.value, size_class(float(mine.sum()), obj.shape, res)
            else:  # shape
                expected, found = edit.value, classify_shape(_largest_blob(mine))[0]

    target = example.output_array
    agree = np.all(example.input_array == target, axis=-1)
    agree = ndimage.binary_erosion(agree, structure=_EIGHT)
    if exclude is not None:
        agree &= ~exclude
    return {
        "success": found == expected,
        "edit_type": edit.type,
        "psnr_unchanged": _psnr(img, target, agree),
        "expected": expected,
        "found": found,
        "preserved": _preserved(example, img),
    }


def _preserved(example: Example, img: np.ndarray) -> bool:
    res, edit, after = example.resolution, example.edit, example.output_scene
    keep = list(after.objects)
    if edit.type in ("recolor", "resize", "shape"):
        del keep[edit.index]
    elif edit.type == "add":
        keep = keep[:-1]
    ok = all(region_color(img, interior(o, res)) == o.color for o in keep)
    if edit.type != "background":
        touched = np.zeros((res, res), bool)
        for o in example.input_scene.objects + after.objects:
            touched |= slot_mask(o, res)
        ok = ok and region_color(img, ~touched) in (after.background, None)
    return ok


def aggregate(scores: Iterable[dict]) -> dict:
    """Per edit type and overall: n, success rate, preserved rate, mean unchanged PSNR."""
    groups = defaultdict(list)
    for s in scores:
        groups[s["edit_type"]].append(s)
        groups["overall"].append(s)

    def summary(rows):
        psnr = [r["psnr_unchanged"] for r in rows if not math.isnan(r["psnr_unchanged"])]
        return {
            "n": len(rows),
            "success": float(np.mean([r["success"] for r in rows])),
            "preserved": float(np.mean([r["preserved"] for r in rows])),
            "psnr_unchanged": float(np.mean(psnr)) if psnr else float("nan"),
        }

    order = [t for t in EDIT_TYPES if t in groups] + (["overall"] if groups else [])
    return {t: summary(groups[t]) for t in order}


def format_table(results: dict[str, dict]) -> str:
    """``results`` maps a method name ("model", "identity") to an ``aggregate`` dict."""
    methods = list(results)
    types = list(next(iter(results.values()))) if results else []
    cols = [(f"{m} success", f"{m} preserved", f"{m} PSNR") for m in methods]
    widths = [tuple(max(len(c), 9) for c in group) for group in cols]
    head = f"{'edit type':<11}{'n':>5}" + "".join(
        f"  {a:>{wa}}  {b:>{wb}}  {c:>{wc}}" for (a, b, c), (wa, wb, wc) in zip(cols, widths))
    lines = [head, "-" * len(head)]
    for t in types:
        row = f"{t:<11}{results[methods[0]][t]['n']:>5}"
        for m, (wa, wb, wc) in zip(methods, widths):
            r = results[m][t]
            row += (f"  {100 * r['success']:>{wa - 1}.1f}%  {100 * r['preserved']:>{wb - 1}.1f}%"
                    f"  {r['psnr_unchanged']:>{wc - 3}.1f} dB")
        lines.append(row)
    return "\n".join(lines)
