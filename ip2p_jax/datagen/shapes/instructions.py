"""Stage (a) in miniature: a rule-based instruction writer (the GPT-3 stand-in).

``sample_prompt`` returns a line of the authors' generated-prompt JSONL:
``{"input": caption, "edit": instruction, "output": edited caption, "url": id}``.
Objects are named by the shortest-or-longer description that is unique in the
scene ("the circle", "the red circle", "the small circle", ...), picked at
random among the unique ones. ``parse_instruction`` inverts the templates, so
tests can check that every instruction names exactly the edit it claims.
"""

from __future__ import annotations

import itertools
import re
from typing import Iterator, Optional

import numpy as np

from .caption import caption, describe_object, parse_object
from .world import (COLORS, EDIT_TYPES, MAX_OBJECTS, SHAPES, SIZES, Edit, Obj, Scene,
                    SceneError, apply_edit, sample_edit, sample_scene)

# Fields: {obj} an object of the scene, {color}, {shape}, {new} "a small blue star".
TEMPLATES: dict[str, tuple[str, ...]] = {
    "recolor": (
        "make the {obj} {color}",
        "turn the {obj} {color}",
        "change the color of the {obj} to {color}",
        "paint the {obj} {color}",
        "color the {obj} {color}",
        "the {obj} should be {color}",
    ),
    "background": (
        "make the background {color}",
        "change the background to {color}",
        "turn the background {color}",
        "paint the background {color}",
        "change the background color to {color}",
    ),
    "add": (
        "add {new}",
        "put {new} in the picture",
        "draw {new}",
        "insert {new}",
        "there should also be {new}",
    ),
    "remove": (
        "remove the {obj}",
        "delete the {obj}",
        "take away the {obj}",
        "get rid of the {obj}",
        "erase the {obj}",
    ),
    "resize:large": (
        "make the {obj} bigger",
        "make the {obj} larger",
        "enlarge the {obj}",
        "increase the size of the {obj}",
    ),
    "resize:small": (
        "make the {obj} smaller",
        "shrink the {obj}",
        "reduce the size of the {obj}",
        "make the {obj} small",
    ),
    "shape": (
        "turn the {obj} into a {shape}",
        "make the {obj} a {shape}",
        "change the {obj} to a {shape}",
        "replace the {obj} with a {shape}",
        "reshape the {obj} into a {shape}",
    ),
}

_REFERENCE_FORMS = (("shape",), ("color", "shape"), ("size", "shape"), ("size", "color", "shape"))


def _matches(o: Obj, words: dict) -> bool:
    return all(getattr(o, k) == v for k, v in words.items())


def reference_options(scene: Scene, index: int) -> list[str]:
    """Descriptions ("circle", "red circle", ...) that name object ``index`` alone."""
    o = scene.objects[index]
    out = []
    for form in _REFERENCE_FORMS:
        words = {k: getattr(o, k) for k in form}
        if sum(_matches(x, words) for x in scene.objects) == 1:
            out.append(" ".join(words[k] for k in ("size", "color", "shape") if k in words))
    return out  # never empty: colour + shape is unique in a valid scene


def resolve_reference(scene: Scene, text: str) -> int:
    """Index of the one object that ``text`` ("small red circle") names."""
    words = text.split()
    kinds = {}
    for w in words:
        kind = "size" if w in SIZES else "color" if w in COLORS else "shape" if w in SHAPES else None
        if kind is None or kind in kinds:
            raise SceneError(f"cannot read object reference {text!r}")
        kinds[kind] = w
    hits = [i for i, o in enumerate(scene.objects) if _matches(o, kinds)]
    if len(hits) != 1:
        raise SceneError(f"{text!r} names {len(hits)} objects of the scene, not one")
    return hits[0]


def template_key(edit: Edit) -> str:
    return f"resize:{edit.value}" if edit.type == "resize" else edit.type


def write_instruction(rng: np.random.Generator, scene: Scene, edit: Edit) -> str:
    template = TEMPLATES[template_key(edit)][rng.integers(len(TEMPLATES[template_key(edit)]))]
    fields = {}
    if edit.index is not None:
        refs = reference_options(scene, edit.index)
        fields["obj"] = refs[rng.integers(len(refs))]
    if edit.type in ("recolor", "background"):
        fields["color"] = edit.value
    elif edit.type == "shape":
        fields["shape"] = edit.value
    elif edit.type == "add":
        fields["new"] = describe_object(edit.value)
    return template.format(**fields)


def _alt(words) -> str:
    return "|".join(words)


_FIELD_PATTERNS = {
    "obj": rf"(?P<obj>(?:(?:{_alt(SIZES)}) )?(?:(?:{_alt(COLORS)}) )?(?:{_alt(SHAPES)}))",
    "color": rf"(?P<color>{_alt(COLORS)})",
    "shape": rf"(?P<shape>{_alt(SHAPES)})",
    "new": rf"(?P<new>a (?:{_alt(SIZES)}) (?:{_alt(COLORS)}) (?:{_alt(SHAPES)}))",
}


def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)  # literal, field, literal, ...
    return re.compile("".join(re.escape(p) if i % 2 == 0 else _FIELD_PATTERNS[p]
                              for i, p in enumerate(parts)))


_PARSERS = [(key, t, _template_regex(t)) for key, ts in TEMPLATES.items() for t in ts]


def parse_instruction(scene: Scene, instruction: str) -> Edit:
    """The edit that ``instruction`` asks of ``scene`` (the inverse of the writer)."""
    found = set()
    for key, _, regex in _PARSERS:
        m = regex.fullmatch(instruction.strip())
        if not m:
            continue
        g = m.groupdict()
        index = resolve_reference(scene, g["obj"]) if "obj" in g else None
        edit_type, _, size = key.partition(":")
        value = {"recolor": g.get("color"), "background": g.get("color"), "shape": g.get("shape"),
                 "resize": size, "remove": None}.get(edit_type)
        if edit_type == "add":
            value = parse_object(g["new"])
        found.add(Edit(edit_type, index, value))
    if len(found) != 1:
        raise SceneError(f"instruction {instruction!r} matches {len(found)} edits of the scene")
    return found.pop()


def sample_prompt(rng: np.random.Generator, edit_type: Optional[str] = None, url: str = "") -> dict:
    """One authors'-format prompt line. Edit types are drawn uniformly; the scene is
    drawn so that the type applies (add: 1-2 objects, remove: 2-3)."""
    if edit_type is None:
        edit_type = EDIT_TYPES[rng.integers(len(EDIT_TYPES))]
    lo, hi = {"add": (1, MAX_OBJECTS - 1), "remove": (2, MAX_OBJECTS)}.get(edit_type, (1, MAX_OBJECTS))
    scene = sample_scene(rng, int(rng.integers(lo, hi + 1)))
    edit = sample_edit(rng, scene, edit_type)
    return {
        "input": caption(scene),
        "edit": write_instruction(rng, scene, edit),
        "output": caption(apply_edit(scene, edit)),
        "url": url,
    }


def generate_prompts(num: int, seed: int) -> Iterator[dict]:
    """``num`` distinct prompt lines (no repeated (input, edit, output) triple),
    deterministic in ``seed``. ``url`` is a synthetic id ``shapes://<seed>/<i>``."""
    rng = np.random.default_rng([int(seed), 0x9E3])
    seen = set()
    for attempt in itertools.count():
        if len(seen) == num:
            return
        if attempt > 20 * num + 1000:
            raise SceneError(f"could not find {num} distinct prompts (world too small?)")
        line = sample_prompt(rng, url=f"shapes://{seed}/{len(seen)}")
        key = (line["input"], line["edit"], line["output"])
        if key not in seen:
            seen.add(key)
            yield line
