"""The synthetic shapes world: a tiny instruction-editing world with known ground truth.

world.py          scenes (background + 1-3 objects), seed-driven layout, the six edits
caption.py        caption grammar and its parser
instructions.py   stage (a): rule-based instruction writer -> authors' prompt JSONL lines
render.py         anti-aliased renderer (64/128/256 px) and object coverage masks
pairs.py          stage (b): ground-truth pairs in the authors' on-disk layout
score.py          judging an edited image per edit type; aggregate table
evaluate.py       editing held-out examples with a model and scoring it against identity
"""

from .caption import caption, parse_caption
from .instructions import generate_prompts, parse_instruction, sample_prompt, write_instruction
from .pairs import Example, make_example, read_prompts, sample_seeds, write_pairs
from .render import coverage, render, render_array
from .score import aggregate, format_table, score_edit
from .world import (COLORS, EDIT_TYPES, PALETTE, SHAPES, SIZES, Edit, Layout, Obj, Scene,
                    SceneError, apply_edit, diff_scenes, sample_scene)

__all__ = [
    "COLORS", "EDIT_TYPES", "PALETTE", "SHAPES", "SIZES", "Edit", "Example", "Layout", "Obj",
    "Scene", "SceneError", "aggregate", "apply_edit", "caption", "coverage", "diff_scenes",
    "format_table", "generate_prompts", "make_example", "parse_caption", "parse_instruction",
    "read_prompts", "render", "render_array", "sample_prompt", "sample_scene", "sample_seeds",
    "score_edit", "write_instruction", "write_pairs",
]
