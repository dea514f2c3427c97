"""Stage (b) in miniature: render the pair of a prompt line and write the
authors' on-disk layout.

    <out>/<7-digit prompt index>/prompt.json      the JSONL line
                                  <seed>_0.jpg     input image
                                  <seed>_1.jpg     edited image
                                  metadata.jsonl   one line per seed (edit, placed scenes)
    <out>/seeds.json                               sorted [[dir_name, [seeds...]], ...]

Both images of a pair are rendered from the same seed, so unchanged objects sit
at the same pixels. Prompt dirs are written atomically (see ip2p_jax.datagen.layout): a rerun
skips finished dirs and a killed run loses nothing finished.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from ip2p_jax.progress import progress as progress_bar

from ..layout import (PROMPT_KEYS, collect_seeds, dir_name, finish,  # noqa: F401
                      is_finished, remove_empty_partial_root, remove_stale_partial_dirs,
                      staged_prompt_dir)
from ..layout import read_prompts as _read_prompts
from .caption import parse_caption
from .render import DEFAULT_RESOLUTION, render_array
from .world import Edit, Layout, Obj, Scene, SceneError, apply_edit, diff_scenes

JPEG_QUALITY = 95


@dataclasses.dataclass(frozen=True)
class Example:
    """One pair with its ground truth: placed input/output scenes and the edit."""

    prompt: dict
    seed: int
    resolution: int
    edit: Edit
    input_scene: Scene
    output_scene: Scene

    @property
    def instruction(self) -> str:
        return self.prompt["edit"]

    @functools.cached_property
    def input_array(self) -> np.ndarray:
        return render_array(self.input_scene, self.resolution)

    @functools.cached_property
    def output_array(self) -> np.ndarray:
        return render_array(self.output_scene, self.resolution)

    def input_image(self) -> Image.Image:
        return Image.fromarray(self.input_array)

    def output_image(self) -> Image.Image:
        return Image.fromarray(self.output_array)

    def metadata(self) -> dict:
        value = self.edit.value.to_dict() if isinstance(self.edit.value, Obj) else self.edit.value
        return {
            "seed": self.seed,
            "edit_type": self.edit.type,
            "edit": {"type": self.edit.type, "index": self.edit.index, "value": value},
            "resolution": self.resolution,
            "input_scene": self.input_scene.to_dict(),
            "output_scene": self.output_scene.to_dict(),
        }


def make_example(prompt: dict, seed: int, resolution: int = DEFAULT_RESOLUTION) -> Example:
    """Rebuild a pair's ground truth from its prompt line and seed. Raises SceneError
    if the line lacks a key or its captions are not one edit apart in the grammar."""
    missing = [k for k in PROMPT_KEYS if not isinstance(prompt.get(k), str)]
    if missing:
        raise SceneError(f"prompt line lacks text key(s) {missing}: {prompt}")
    before, after = parse_caption(prompt["input"]), parse_caption(prompt["output"])
    edit = diff_scenes(before, after)
    layout = Layout.from_seed(seed)
    placed_in = layout.place(before)
    return Example(prompt, int(seed), resolution, edit, placed_in, apply_edit(placed_in, edit, layout))


def sample_seeds(base_seed: int, prompt_index: int, k: int) -> list[int]:
    """``k`` distinct image seeds of a prompt, deterministic in (base_seed, index)."""
    rng = np.random.default_rng([int(base_seed), int(prompt_index), 0xB1])
    return sorted(int(s) for s in rng.choice(2**31 - 1, size=k, replace=False))


def read_prompts(path) -> list[dict]:
    """The lines of a prompts JSONL file; a bad line raises SceneError naming file and line."""
    return _read_prompts(path, error=SceneError)


def write_prompt_dir(out: Path, index: int, prompt: dict, seeds: list[int],
                     resolution: int = DEFAULT_RESOLUTION, quality: int = JPEG_QUALITY) -> bool:
    """Write one finished prompt dir; return False if it already existed."""
    if is_finished(out, index, prompt, error=SceneError):
        return False
    with staged_prompt_dir(out, index, prompt) as tmp:
        meta = []
        for seed in seeds:
            ex = make_example(prompt, seed, resolution)
            for k, img in enumerate((ex.input_image(), ex.output_image())):
                img.save(tmp / f"{seed}_{k}.jpg", quality=quality, subsampling=0)
            meta.append(json.dumps(ex.metadata()))
        (tmp / "metadata.jsonl").write_text("\n".join(meta) + "\n")
    return True


def _write_job(job):
    out, index, prompt, seeds, resolution, quality = job
    return write_prompt_dir(Path(out), index, prompt, seeds, resolution, quality)


@dataclasses.dataclass
class WriteStats:
    written: int
    skipped: int
    pairs: int


def write_pairs(prompts: Iterable[dict], out, samples_per_prompt: int = 1, seed: int = 0,
                resolution: int = DEFAULT_RESOLUTION, quality: int = JPEG_QUALITY,
                workers: int = 1, progress: bool = True) -> WriteStats:
    """Write every prompt's dir (skipping finished ones), then ``seeds.json``. JPEGs
    are saved at ``quality`` without chroma subsampling (colour edges stay crisp)."""
    prompts = list(prompts)
    for i, p in enumerate(prompts):  # every line is checked before anything is written
        try:
            make_example(p, 0, resolution)
        except SceneError as e:
            raise SceneError(f"prompt {i} ({p.get('edit')!r}): {e}") from None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_partial_dirs(out)
    jobs = [(str(out), i, p, sample_seeds(seed, i, samples_per_prompt), resolution, quality)
            for i, p in enumerate(prompts)]
    written = skipped = 0
    bar = progress_bar(total=len(jobs), desc="shapes pairs", unit="prompt", enabled=progress)
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        results = pool.map(_write_job, jobs, chunksize=16) if pool else map(_write_job, jobs)
        for new in results:
            written += new
            skipped += not new
            bar.update()
    finally:
        bar.close()
        if pool:
            pool.shutdown(cancel_futures=True)
        remove_empty_partial_root(out)
    entries = finish(out)
    return WriteStats(written, skipped, sum(len(s) for _, s in entries))
