"""Evaluating an editor on held-out shapes-world examples, beside the identity baseline."""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

from ip2p_jax.progress import progress as progress_bar

from .instructions import generate_prompts
from .pairs import Example, make_example, sample_seeds
from .render import DEFAULT_RESOLUTION
from .score import aggregate, score_edit
from .world import SceneError

EditFn = Callable[[list, list], Sequence]  # (input PIL images, instructions) -> edited images


def held_out_examples(num: int, seed: int, resolution: int = DEFAULT_RESOLUTION,
                      exclude: Iterable[dict] = ()) -> list[Example]:
    """``num`` examples from prompt seed ``seed`` (image seeds derived from it too),
    skipping prompts whose (input, output) captions appear in ``exclude`` (e.g. the
    training prompts). Use a seed the training data did not use."""
    seen = {(p["input"], p["output"]) for p in exclude}
    examples = []
    for p in generate_prompts(20 * num + 1000, seed):
        if (p["input"], p["output"]) in seen:
            continue
        i = len(examples)
        examples.append(make_example(p, sample_seeds(seed, i, 1)[0], resolution))
        if len(examples) == num:
            return examples
    raise SceneError(f"could not find {num} held-out prompts outside the excluded set")


def score_images(examples: Sequence[Example], images: Sequence, progress: bool = False) -> list[dict]:
    if len(images) != len(examples):
        raise ValueError(f"{len(images)} edited images for {len(examples)} examples")
    return [score_edit(e, img) for e, img in
            progress_bar(zip(examples, images), total=len(examples), desc="scoring", enabled=progress)]


def evaluate(edit_fn: EditFn, examples: Sequence[Example], progress: bool = False) -> tuple[dict, list]:
    """Edit every example with ``edit_fn`` and score it; also score the identity
    (the input returned unchanged). Returns ({"model": scores, "identity": scores},
    edited images)."""
    inputs = [e.input_image() for e in examples]
    edited = list(edit_fn(inputs, [e.instruction for e in examples]))
    scores = {"model": score_images(examples, edited, progress),
              "identity": score_images(examples, inputs, progress)}
    return scores, edited


def autoencoder_ceiling(autoencode: Callable[[list], Sequence], examples: Sequence[Example],
                        progress: bool = False) -> list[dict]:
    """Scores of the expected outputs passed through a model's autoencoder (``autoencode``: PIL
    images -> PIL images): what a perfect editor would score with that VAE."""
    return score_images(examples, list(autoencode([e.output_image() for e in examples])), progress)


def _clean(x):
    return None if isinstance(x, float) and math.isnan(x) else x


def summary(scores: dict) -> dict:
    """JSON-ready summary per method: success rate per type, overall, preserved, PSNR."""
    out = {}
    for method, rows in scores.items():
        agg = aggregate(rows)
        overall = agg.pop("overall")
        out[method] = {
            "success": {t: r["success"] for t, r in agg.items()},
            "overall_success": overall["success"],
            "preserved": overall["preserved"],
            "psnr_unchanged": _clean(overall["psnr_unchanged"]),
            "psnr_unchanged_per_type": {t: _clean(r["psnr_unchanged"]) for t, r in agg.items()},
            "n": overall["n"],
        }
    return out
