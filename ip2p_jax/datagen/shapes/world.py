"""The shapes world: scenes, their layout on the canvas, and the six edits.

A scene is a background colour and 1-3 objects (shape, colour, size class).
Within a scene no two objects share both colour and shape, and no object has
the background's colour, so "the red circle" always names one object.

Layout: the canvas is a 2x2 grid of cells; a seed picks an order of the cells
and a jitter per cell. Object k of the caption sits in cell ``order[k]``; an
added object takes the first free cell in that order. Each object owns a
"slot" (a square around its centre) that no other slot touches, so objects
never overlap and stay fully inside, whatever their size or shape. Because
positions come from (caption, seed), a pair is reproducible from its prompt
and seed alone, as with the authors' data (the caption says what, the seed
says where).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from ip2p_jax.errors import Ip2pError

# Named palette, chosen to be far apart in RGB.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (35, 70, 225),
    "yellow": (245, 215, 25),
    "purple": (135, 45, 175),
    "orange": (245, 135, 10),
    "white": (255, 255, 255),
    "black": (15, 15, 15),
}
COLORS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle", "star", "diamond")
SIZES = ("small", "large")
EDIT_TYPES = ("recolor", "background", "add", "remove", "resize", "shape")

# Geometry, in units of the image side. An object's half-extent (its bounding
# box is 2 * HALF_SIZE wide); jitter moves a centre within its cell; SLOT is
# the half-width of the square an object owns: HALF_SIZE["large"] + margin.
HALF_SIZE = {"small": 0.10, "large": 0.18}
JITTER = 0.05
SLOT = 0.25 - JITTER  # = large half-size + 0.02 margin; slots of two cells never overlap
CELL_CENTERS = ((0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75))  # (x, y)
MAX_OBJECTS = 3


class SceneError(Ip2pError):
    """A scene, caption or edit that the shapes world does not allow."""


@dataclasses.dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    center: Optional[tuple[float, float]] = None  # (x, y) in [0, 1]; None = not placed

    def unplaced(self) -> "Obj":
        return dataclasses.replace(self, center=None)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[Obj, ...]

    def unplaced(self) -> "Scene":
        return Scene(self.background, tuple(o.unplaced() for o in self.objects))

    def to_dict(self) -> dict:
        return {"background": self.background, "objects": [o.to_dict() for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        objs = tuple(
            Obj(o["shape"], o["color"], o["size"], tuple(o["center"]) if o.get("center") else None)
            for o in d["objects"]
        )
        return cls(d["background"], objs)


@dataclasses.dataclass(frozen=True)
class Edit:
    """One edit. ``index`` is the object's index in the input scene (None for
    background/add); ``value`` is the new colour / size / shape, or the added Obj."""

    type: str
    index: Optional[int]
    value: object


def validate(scene: Scene) -> None:
    """Raise SceneError unless the scene obeys the world's rules."""
    if scene.background not in PALETTE:
        raise SceneError(f"unknown background colour {scene.background!r}")
    if not 1 <= len(scene.objects) <= MAX_OBJECTS:
        raise SceneError(f"a scene has 1-{MAX_OBJECTS} objects, got {len(scene.objects)}")
    seen = set()
    for o in scene.objects:
        if o.shape not in SHAPES or o.color not in PALETTE or o.size not in SIZES:
            raise SceneError(f"unknown object {o.size} {o.color} {o.shape}")
        if o.color == scene.background:
            raise SceneError(f"the {o.color} {o.shape} has the background's colour")
        if (o.color, o.shape) in seen:
            raise SceneError(f"two {o.color} {o.shape}s: objects must be distinguishable")
        seen.add((o.color, o.shape))


# ----------------------------------------------------------------------------- layout


@dataclasses.dataclass(frozen=True)
class Layout:
    cell_order: tuple[int, ...]
    centers: tuple[tuple[float, float], ...]  # jittered centre of each cell, indexed by cell

    @classmethod
    def from_seed(cls, seed: int) -> "Layout":
        rng = np.random.default_rng([int(seed), 0x5A4E5])
        order = tuple(int(i) for i in rng.permutation(len(CELL_CENTERS)))
        jitter = rng.uniform(-JITTER, JITTER, size=(len(CELL_CENTERS), 2))
        centers = tuple(
            (float(cx + jx), float(cy + jy)) for (cx, cy), (jx, jy) in zip(CELL_CENTERS, jitter)
        )
        return cls(order, centers)

    def place(self, scene: Scene) -> Scene:
        """The scene with object k at the centre of cell ``cell_order[k]``."""
        objs = tuple(
            dataclasses.replace(o, center=self.centers[c])
            for o, c in zip(scene.objects, self.cell_order)
        )
        return Scene(scene.background, objs)

    def free_center(self, placed: Scene) -> tuple[float, float]:
        """Centre of the first cell (in this layout's order) no object of ``placed`` uses."""
        used = {o.center for o in placed.objects}
        for c in self.cell_order:
            if self.centers[c] not in used:
                return self.centers[c]
        raise SceneError("no free cell for a new object")


# ----------------------------------------------------------------------------- sampling


def _object_choices(scene_objects, background, exclude=()):
    taken = {(o.color, o.shape) for o in scene_objects}
    return [
        (c, s) for c in COLORS for s in SHAPES
        if c != background and (c, s) not in taken and (c, s) not in exclude
    ]


def sample_scene(rng: np.random.Generator, num_objects: Optional[int] = None) -> Scene:
    """A random unplaced scene (1-3 objects unless ``num_objects`` is given)."""
    n = int(rng.integers(1, MAX_OBJECTS + 1)) if num_objects is None else num_objects
    background = COLORS[rng.integers(len(COLORS))]
    objs: list[Obj] = []
    for _ in range(n):
        choices = _object_choices(objs, background)
        color, shape = choices[rng.integers(len(choices))]
        objs.append(Obj(shape, color, SIZES[rng.integers(len(SIZES))]))
    scene = Scene(background, tuple(objs))
    validate(scene)
    return scene


def applicable_edit_types(scene: Scene) -> list[str]:
    n = len(scene.objects)
    return [t for t in EDIT_TYPES
            if not (t == "add" and n >= MAX_OBJECTS) and not (t == "remove" and n <= 1)]


def sample_edit(rng: np.random.Generator, scene: Scene, edit_type: str) -> Edit:
    """A random valid edit of ``edit_type`` for ``scene`` (raises if none exists)."""
    objs = scene.objects

    def pick(seq):
        if not seq:
            raise SceneError(f"no valid {edit_type} edit for {scene}")
        return seq[rng.integers(len(seq))]

    if edit_type == "background":
        used = {o.color for o in objs} | {scene.background}
        return Edit("background", None, pick([c for c in COLORS if c not in used]))
    if edit_type == "add":
        color, shape = pick(_object_choices(objs, scene.background))
        return Edit("add", None, Obj(shape, color, SIZES[rng.integers(len(SIZES))]))
    if edit_type == "remove":
        return Edit("remove", int(rng.integers(len(objs))), None)
    i = int(rng.integers(len(objs)))
    o, others = objs[i], objs[:i] + objs[i + 1:]
    if edit_type == "recolor":
        free = {c for c, s in _object_choices(others, scene.background) if s == o.shape}
        return Edit("recolor", i, pick([c for c in COLORS if c in free and c != o.color]))
    if edit_type == "resize":
        return Edit("resize", i, "small" if o.size == "large" else "large")
    if edit_type == "shape":
        free = {s for c, s in _object_choices(others, scene.background) if c == o.color}
        return Edit("shape", i, pick([s for s in SHAPES if s in free and s != o.shape]))
    raise SceneError(f"unknown edit type {edit_type!r}")


# ----------------------------------------------------------------------------- edits


def apply_edit(scene: Scene, edit: Edit, layout: Optional[Layout] = None) -> Scene:
    """The edited scene. Unchanged objects keep their place; an added object goes
    to ``layout.free_center`` when the scene is placed."""
    objs = list(scene.objects)
    bg = scene.background
    if edit.type == "background":
        bg = edit.value
    elif edit.type == "add":
        new = edit.value
        if objs and objs[0].center is not None:
            if layout is None:
                raise SceneError("adding to a placed scene needs its layout")
            new = dataclasses.replace(new, center=layout.free_center(scene))
        objs.append(new)
    elif edit.type == "remove":
        del objs[edit.index]
    elif edit.type in ("recolor", "resize", "shape"):
        field = {"recolor": "color", "resize": "size", "shape": "shape"}[edit.type]
        objs[edit.index] = dataclasses.replace(objs[edit.index], **{field: edit.value})
    else:
        raise SceneError(f"unknown edit type {edit.type!r}")
    out = Scene(bg, tuple(objs))
    validate(out)
    return out


def diff_scenes(before: Scene, after: Scene) -> Edit:
    """The single edit turning ``before`` into ``after`` (unplaced scenes; edits keep
    object order and append added objects). Raises SceneError otherwise."""
    a, b = before.unplaced(), after.unplaced()
    if a.background != b.background:
        if a.objects == b.objects:
            return Edit("background", None, b.background)
    elif len(b.objects) == len(a.objects) + 1 and b.objects[:-1] == a.objects:
        return Edit("add", None, b.objects[-1])
    elif len(b.objects) == len(a.objects) - 1:
        hits = [i for i in range(len(a.objects)) if a.objects[:i] + a.objects[i + 1:] == b.objects]
        if len(hits) == 1:
            return Edit("remove", hits[0], None)
    elif len(a.objects) == len(b.objects):
        changed = [i for i, (x, y) in enumerate(zip(a.objects, b.objects)) if x != y]
        if len(changed) == 1:
            i = changed[0]
            x, y = a.objects[i], b.objects[i]
            fields = [f for f in ("color", "size", "shape") if getattr(x, f) != getattr(y, f)]
            if len(fields) == 1:
                kind = {"color": "recolor", "size": "resize", "shape": "shape"}[fields[0]]
                return Edit(kind, i, getattr(y, fields[0]))
    raise SceneError("the two scenes do not differ by exactly one edit")
