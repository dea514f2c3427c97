"""Anti-aliased rendering of placed scenes.

Each object is drawn binary at ``supersample`` times the resolution on a small
canvas around it; the mean over each pixel's subpixels is its coverage. A
scene is the background colour blended with each object's colour by its
coverage (objects never overlap), so the pixels an object touches are exactly
those where its coverage is > 0 -- the scorer and the tests use the same masks.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image, ImageDraw

from .world import HALF_SIZE, PALETTE, SLOT, Obj, Scene, SceneError

DEFAULT_RESOLUTION = 64
RESOLUTIONS = (64, 128, 256)
SUPERSAMPLE = 4
STAR_INNER = 0.5  # inner / outer radius of the five-pointed star


def _vertices(shape: str, cx: float, cy: float, h: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        return [(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)]
    if shape == "star":
        return [(cx + r * math.cos(a), cy + r * math.sin(a))
                for k in range(10)
                for r, a in [(h if k % 2 == 0 else h * STAR_INNER, -math.pi / 2 + k * math.pi / 5)]]
    raise SceneError(f"unknown shape {shape!r}")


@functools.lru_cache(maxsize=None)
def shape_moments(shape: str) -> tuple[float, float, float]:
    """(area, centroid x, centroid y) of a shape of half-size 1 centred at 0."""
    if shape == "circle":
        return math.pi, 0.0, 0.0
    pts = _vertices(shape, 0.0, 0.0, 1.0)
    a = cx = cy = 0.0
    for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1]):  # shoelace
        cross = x0 * y1 - x1 * y0
        a += cross
        cx += (x0 + x1) * cross
        cy += (y0 + y1) * cross
    a /= 2
    return abs(a), cx / (6 * a), cy / (6 * a)


def _local_shape_coverage(shape: str, cx: float, cy: float, h: float, resolution: int,
                          supersample: int) -> tuple[int, int, np.ndarray]:
    """(y0, x0, coverage of the box [y0:y0+rows, x0:x0+cols] around the shape); centre
    (cx, cy) and half-size h in pixels."""
    x0, y0 = max(int(math.floor(cx - h)) - 1, 0), max(int(math.floor(cy - h)) - 1, 0)
    x1 = min(int(math.ceil(cx + h)) + 1, resolution)
    y1 = min(int(math.ceil(cy + h)) + 1, resolution)
    if x1 <= x0 or y1 <= y0:
        return 0, 0, np.zeros((0, 0), np.float32)
    lx, ly, hs = (cx - x0) * supersample, (cy - y0) * supersample, h * supersample
    img = Image.new("L", ((x1 - x0) * supersample, (y1 - y0) * supersample), 0)
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse([lx - hs, ly - hs, lx + hs, ly + hs], fill=1)
    else:
        draw.polygon(_vertices(shape, lx, ly, hs), fill=1)
    sub = np.asarray(img).reshape(y1 - y0, supersample, x1 - x0, supersample)
    return y0, x0, sub.sum(axis=(1, 3), dtype=np.float32) / supersample**2


def shape_coverage(shape: str, cx: float, cy: float, h: float, resolution: int,
                   supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Coverage (resolution, resolution) of any shape: centre and half-size in pixels."""
    y0, x0, local = _local_shape_coverage(shape, cx, cy, h, resolution, supersample)
    out = np.zeros((resolution, resolution), np.float32)
    out[y0:y0 + local.shape[0], x0:x0 + local.shape[1]] = local
    return out


@functools.lru_cache(maxsize=4096)
def _local_coverage(o: Obj, resolution: int, supersample: int) -> tuple[int, int, np.ndarray]:
    if o.center is None:
        raise SceneError(f"object {o.size} {o.color} {o.shape} has no position (place the scene first)")
    y0, x0, local = _local_shape_coverage(o.shape, o.center[0] * resolution, o.center[1] * resolution,
                                          HALF_SIZE[o.size] * resolution, resolution, supersample)
    local.flags.writeable = False
    return y0, x0, local


@functools.lru_cache(maxsize=4096)
def coverage(o: Obj, resolution: int = DEFAULT_RESOLUTION, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Fraction of each pixel the object covers, float32 (resolution, resolution), read-only."""
    y0, x0, local = _local_coverage(o, resolution, supersample)
    out = np.zeros((resolution, resolution), np.float32)
    out[y0:y0 + local.shape[0], x0:x0 + local.shape[1]] = local
    out.flags.writeable = False
    return out


def render_array(scene: Scene, resolution: int = DEFAULT_RESOLUTION,
                 supersample: int = SUPERSAMPLE) -> np.ndarray:
    """uint8 (resolution, resolution, 3) image of a placed scene."""
    bg = np.array(PALETTE[scene.background], np.float32)
    img = np.empty((resolution, resolution, 3), np.uint8)
    img[:] = PALETTE[scene.background]
    for o in scene.objects:
        # Objects never overlap; boxes may, but a box adds nothing where its coverage is 0.
        y0, x0, local = _local_coverage(o, resolution, supersample)
        box = np.s_[y0:y0 + local.shape[0], x0:x0 + local.shape[1]]
        delta = np.array(PALETTE[o.color], np.float32) - bg
        img[box] = np.rint(img[box] + local[..., None] * delta).astype(np.uint8)
    return img


def render(scene: Scene, resolution: int = DEFAULT_RESOLUTION, supersample: int = SUPERSAMPLE) -> Image.Image:
    """RGB PIL image of a placed scene."""
    return Image.fromarray(render_array(scene, resolution, supersample))


def slot_mask(o: Obj, resolution: int = DEFAULT_RESOLUTION) -> np.ndarray:
    """Boolean mask of the square an object owns (pixels whose centre lies in it);
    no other object's slot touches it, whatever the sizes."""
    centers = (np.arange(resolution) + 0.5) / resolution
    inside_x = np.abs(centers - o.center[0]) <= SLOT
    inside_y = np.abs(centers - o.center[1]) <= SLOT
    return inside_y[:, None] & inside_x[None, :]
