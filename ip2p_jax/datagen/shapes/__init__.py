"""The synthetic shapes world: a tiny instruction-editing world with known ground truth.

The paper's two data stages in miniature, through the real formats:
  scripts/shapes_prompts.py  -> prompts JSONL, keys input / edit / output / url (as the authors')
  scripts/shapes_pairs.py    -> <out>/<7-digit>/{prompt.json, <seed>_0.jpg, <seed>_1.jpg,
                                metadata.jsonl} + seeds.json (as the authors')
  scripts/build_tfds.py --format authors  reads that layout like the real data
  scripts/evaluate_shapes.py -> per-edit-type success of a model vs the identity

Design choices:
- Positions are not in the prompt line: the caption says what, the image seed says
  where (a 2x2 grid, cell order and jitter drawn from the seed), as with the real
  data where each seed of a prompt is a different picture. (prompt line, seed) ->
  both scenes exactly; metadata.jsonl also records the placed scenes.
- Edits keep caption order (an added object is appended), so the edit is read
  back by diffing the two parsed captions; the instruction is parsed only in tests.
- Added objects are judged anywhere in free space (the seed, not the instruction,
  places them); see score.py for every rule.

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
