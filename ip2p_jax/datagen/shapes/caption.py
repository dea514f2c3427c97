"""Caption grammar of the shapes world, both ways.

    caption    := objects " on " article color " background"
    objects    := object | object " and " object | object ", " object " and " object
    object     := "a " size " " color " " shape

e.g. "a large red circle, a small blue square and a small green star on a white background".
"""

from __future__ import annotations

import re

from .world import COLORS, SHAPES, SIZES, Obj, Scene, SceneError, validate


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe_object(o: Obj) -> str:
    return f"a {o.size} {o.color} {o.shape}"


def caption(scene: Scene) -> str:
    parts = [describe_object(o) for o in scene.objects]
    objects = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{objects} on {article(scene.background)} {scene.background} background"


def _alt(words) -> str:
    return "|".join(words)


_OBJECT = rf"a ({_alt(SIZES)}) ({_alt(COLORS)}) ({_alt(SHAPES)})"
_OBJECT_RE = re.compile(_OBJECT)
_CAPTION_RE = re.compile(
    rf"(?P<objects>{_OBJECT}(?:, {_OBJECT})*(?: and {_OBJECT})?) on an? (?P<bg>{_alt(COLORS)}) background"
)


def parse_object(text: str) -> Obj:
    m = _OBJECT_RE.fullmatch(text.strip())
    if not m:
        raise SceneError(f"not an object description: {text!r}")
    size, color, shape = m.groups()
    return Obj(shape, color, size)


def parse_caption(text: str) -> Scene:
    """Caption -> unplaced Scene; raises SceneError naming the caption if it is
    not in the grammar or describes a scene the world does not allow."""
    m = _CAPTION_RE.fullmatch(text.strip())
    if not m:
        raise SceneError(f"not a shapes-world caption: {text!r}")
    objs = tuple(Obj(shape, color, size) for size, color, shape in _OBJECT_RE.findall(m["objects"]))
    scene = Scene(m["bg"], objs)
    if caption(scene) != text.strip():  # e.g. "x and y and z", or "x, y" without "and"
        raise SceneError(f"caption is not in the canonical form {caption(scene)!r}: {text!r}")
    try:
        validate(scene)
    except SceneError as e:
        raise SceneError(f"{e} (caption {text!r})") from None
    return scene
