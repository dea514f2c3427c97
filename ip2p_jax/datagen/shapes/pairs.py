"""Stage (b) in miniature: render the pair of a prompt line and write the
authors' on-disk layout.

    <out>/<7-digit prompt index>/prompt.json      the JSONL line
                                  <seed>_0.jpg     input image
                                  <seed>_1.jpg     edited image
                                  metadata.jsonl   one line per seed (edit, placed scenes)
    <out>/seeds.json                               sorted [[dir_name, [seeds...]], ...]

Both images of a pair are rendered from the same seed, so unchanged objects sit
at the same pixels. A prompt dir is written as ``<out>/.partial/<name>-<pid>``
and renamed into place when complete: an existing 7-digit dir is finished, a
rerun skips it, and a killed run leaves only a dir under ``.partial/`` (which
no reader of the layout looks into) that the next run removes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .caption import parse_caption
from .render import DEFAULT_RESOLUTION, render_array
from .world import Edit, Layout, Obj, Scene, SceneError, apply_edit, diff_scenes

JPEG_QUALITY = 95
PROMPT_KEYS = ("input", "edit", "output")
_DIR_RE = re.compile(r"^\d{7}$")
_PARTIAL = ".partial"
_PARTIAL_RE = re.compile(r"^(\d{7})-(\d+)$")


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
    """The lines of a prompts JSONL file; a bad line raises naming file and line."""
    prompts = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise SceneError(f"{path}:{n}: not JSON ({e})") from None
            if not isinstance(d, dict) or any(not isinstance(d.get(k), str) for k in PROMPT_KEYS):
                raise SceneError(f"{path}:{n}: a prompt line needs text keys {PROMPT_KEYS}")
            prompts.append(d)
    return prompts


def dir_name(index: int) -> str:
    return f"{index:07d}"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partial_dirs(out: Path) -> int:
    """Delete ``.partial/<name>-<pid>`` dirs whose writer process is gone."""
    n = 0
    for p in (out / _PARTIAL).glob("*"):
        m = _PARTIAL_RE.match(p.name)
        if m and p.is_dir() and (int(m[2]) == os.getpid() or not _pid_alive(int(m[2]))):
            shutil.rmtree(p)
            n += 1
    return n


def write_prompt_dir(out: Path, index: int, prompt: dict, seeds: list[int],
                     resolution: int = DEFAULT_RESOLUTION, quality: int = JPEG_QUALITY) -> bool:
    """Write one finished prompt dir; return False if it already existed."""
    final = out / dir_name(index)
    if final.exists():
        have = json.loads((final / "prompt.json").read_text())
        if have != prompt:
            raise SceneError(f"{final} holds a different prompt ({have.get('edit')!r}, not "
                             f"{prompt.get('edit')!r}); use a fresh --out for a new prompts file")
        return False
    tmp = out / _PARTIAL / f"{dir_name(index)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        meta = []
        for seed in seeds:
            ex = make_example(prompt, seed, resolution)
            for k, img in enumerate((ex.input_image(), ex.output_image())):
                img.save(tmp / f"{seed}_{k}.jpg", quality=quality, subsampling=0)
            meta.append(json.dumps(ex.metadata()))
        (tmp / "metadata.jsonl").write_text("\n".join(meta) + "\n")
        (tmp / "prompt.json").write_text(json.dumps(prompt))
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return True


def _write_job(job):
    out, index, prompt, seeds, resolution, quality = job
    return write_prompt_dir(Path(out), index, prompt, seeds, resolution, quality)


def collect_seeds(out: Path) -> list:
    """``seeds.json`` content: sorted [[dir_name, [seeds...]]] of all finished dirs."""
    entries = []
    for p in sorted(out.iterdir()):
        if _DIR_RE.match(p.name) and p.is_dir():
            lines = (p / "metadata.jsonl").read_text().splitlines()
            entries.append([p.name, sorted(json.loads(l)["seed"] for l in lines if l.strip())])
    return entries


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
    bar = tqdm(total=len(jobs), desc="shapes pairs", unit="prompt", disable=not progress)
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
        try:
            (out / _PARTIAL).rmdir()  # only if empty (no other writer busy)
        except OSError:
            pass
    entries = collect_seeds(out)
    _atomic_write_text(out / "seeds.json", json.dumps(entries))
    return WriteStats(written, skipped, sum(len(s) for _, s in entries))
