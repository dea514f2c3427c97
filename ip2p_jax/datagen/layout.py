"""The authors' on-disk layout of generated pairs, shared by every pair writer.

    <out>/<7-digit prompt index>/prompt.json      the prompt's JSONL line
                                  <seed>_0.jpg     input image
                                  <seed>_1.jpg     edited image
                                  metadata.jsonl   one JSON line per kept seed ("seed" key first)
    <out>/seeds.json                               sorted [[dir_name, [seeds...]], ...]

A prompt dir is written under ``<out>/.partial/<name>-<pid>`` and renamed into place when
complete, so an existing 7-digit dir is finished (a rerun skips it) and a killed run leaves
only a dir under ``.partial/`` (which no reader of the layout looks into); the next run removes
it. A finished dir may keep no seed (every sample filtered out): it is skipped in seeds.json,
as the authors' prepare_dataset.py skips prompt dirs without images.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

from ip2p_jax import files, jsonl
from ip2p_jax.errors import Ip2pError

PROMPT_KEYS = ("input", "edit", "output")
SEEDS_FILE = "seeds.json"
_DIR_RE = re.compile(r"^\d{7}$")
_PARTIAL = ".partial"
_PARTIAL_RE = re.compile(r"^(\d{7})-(\d+)$")


class LayoutError(Ip2pError):
    """A prompts file or output folder that cannot be used; the message names the file."""


def dir_name(index: int) -> str:
    return f"{index:07d}"


def read_prompts(path, error: type[ValueError] = LayoutError) -> list[dict]:
    """The lines of a prompts JSONL file (blank lines skipped; a prompt's index is its position
    among the others). A line that is not a JSON object with text keys input / edit / output
    raises `error` naming file and line."""
    prompts = []
    try:
        f = open(path)
    except OSError as e:
        raise error(f"{path}: cannot read the prompts file: {e.strerror or e}") from None
    with f:
        for n, d in jsonl.objects(f, path, error):
            if any(not isinstance(d.get(k), str) for k in PROMPT_KEYS):
                raise error(f"{path}:{n}: a prompt line needs text keys {PROMPT_KEYS}")
            prompts.append(d)
    return prompts


def remove_stale_partial_dirs(out: Path, indices=None) -> int:
    """Delete ``.partial/<name>-<pid>`` dirs whose writer process is gone (or is this one); with
    `indices`, only those of these prompts (a multi-host job's process: the others' writers run on
    other hosts, where their pids mean nothing here)."""
    n, names = 0, None if indices is None else {dir_name(i) for i in indices}
    for p in (Path(out) / _PARTIAL).glob("*"):
        m = _PARTIAL_RE.match(p.name)
        if m and p.is_dir() and (names is None or m[1] in names) and (
                int(m[2]) == os.getpid() or not files.pid_alive(int(m[2]))):
            shutil.rmtree(p)
            n += 1
    return n


def is_finished(out: Path, index: int, prompt: dict, error: type[ValueError] = LayoutError) -> bool:
    """True if prompt `index` already has its finished dir; `error` if that dir holds another prompt."""
    final = Path(out) / dir_name(index)
    if not final.exists():
        return False
    have = json.loads((final / "prompt.json").read_text())
    if have != prompt:
        raise error(f"{final} holds a different prompt ({have.get('edit')!r}, not {prompt.get('edit')!r}); "
                    "use a fresh output folder for a new prompts file")
    return True


@contextlib.contextmanager
def staged_prompt_dir(out: Path, index: int, prompt: dict) -> Iterator[Path]:
    """Yield an empty staging dir for prompt `index`; on normal exit write prompt.json there and
    rename it to ``<out>/<7 digits>``. On any exception the staging dir is removed."""
    tmp = Path(out) / _PARTIAL / f"{dir_name(index)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        (tmp / "prompt.json").write_text(json.dumps(prompt))
        os.rename(tmp, Path(out) / dir_name(index))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def collect_seeds(out: Path) -> list:
    """``seeds.json`` content: sorted [[dir_name, [seeds...]]] of the finished dirs that kept a seed."""
    entries = []
    for p in sorted(Path(out).iterdir()):
        if _DIR_RE.match(p.name) and p.is_dir():
            seeds = dir_seeds(p)
            if seeds:
                entries.append([p.name, seeds])
    return entries


def dir_seeds(folder: Path) -> list[int]:
    """The sorted kept seeds of one finished prompt dir."""
    lines = (Path(folder) / "metadata.jsonl").read_text().splitlines()
    return sorted(json.loads(line)["seed"] for line in lines if line.strip())


def remove_empty_partial_root(out: Path) -> None:
    """Remove ``.partial/`` if it is empty (it is not while another writer is busy)."""
    try:
        (Path(out) / _PARTIAL).rmdir()
    except OSError:
        pass


def finish(out: Path, extra: list = ()) -> list:
    """Write ``seeds.json`` from every finished dir, plus `extra` entries (those other hosts
    wrote, if their dirs are not visible here), and drop an empty ``.partial/``; returns its entries."""
    out = Path(out)
    remove_empty_partial_root(out)
    entries = dict((name, seeds) for name, seeds in extra if seeds)
    entries.update(collect_seeds(out))
    entries = [[name, entries[name]] for name in sorted(entries)]
    files.write_text(out / SEEDS_FILE, json.dumps(entries))
    return entries
