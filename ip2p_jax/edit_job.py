"""Dataset edits: one edit per row of a manifest (or of an edit-pairs TFDS split), on every host.

    rows, bad = read_manifest("rows.jsonl")          # bad: BadRow(line, reason) for each bad line
    summary = run_job(pipe, rows, "out/", steps=20, bad=bad)
    print(summary.report())

Manifest: one JSON object per line, `image` (a local path; relative paths are relative to the
manifest's folder), `instruction`, and optionally `seed` (default: the job's base seed + line
number), `text_scale`, `image_scale` (default: the job's), `id` (default: the line number; it
names the output, so letters, digits, `.`, `_` and `-` only). Row i of the valid rows belongs to
process i % P: each process reads headers and pixels of its own rows only and writes only
`OUT/<id>.png` and then `OUT/<id>.json` (the settings sidecar, written last: its presence marks
the row complete). Re-running the same job skips complete rows, so a killed job resumes with no
duplicate, missing or truncated output.

Batches: rows are grouped by edit size; per size, every process edits `per_device_batch` rows per
local device per call (the last call padded, the pads dropped), the processes agreeing on the
number of calls by one small all-gather. With the rows per device fixed and per-row noise keys,
a row's result depends only on itself: 1 process = 2 processes = 4 devices, bit for bit.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import os
import re
import time
from typing import Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image

from ip2p_jax import files
from ip2p_jax import images as imlib
from ip2p_jax import jsonl
from ip2p_jax.errors import Ip2pError
from ip2p_jax.edit_request import MAX_SCALE, check_request
from ip2p_jax.pipeline import EditPipeline
from ip2p_jax.progress import progress

log = logging.getLogger(__name__)

ID_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")
PER_DEVICE_BATCH = 2            # rows per device per compiled call (fixed: results do not depend on it)
MAX_SIZES = 256                 # distinct edit sizes in one job


class JobError(Ip2pError):
    """A dataset edit that cannot run: a bad manifest or dataset, or a bad row with --strict."""


@dataclasses.dataclass
class Row:
    line: int                   # manifest line (1-based) or dataset record index
    id: str
    image: str | Callable[[], bytes]   # a path, or a reader of the encoded image
    instruction: str
    seed: int
    text_scale: float | None = None     # None: the job's
    image_scale: float | None = None
    where: str = ""             # the path, or "dataset record N", for messages

    def open(self) -> Image.Image:
        if isinstance(self.image, str):
            return Image.open(self.image)
        return Image.open(io.BytesIO(self.image()))


@dataclasses.dataclass
class BadRow:
    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


@dataclasses.dataclass
class JobSummary:
    done: int = 0               # written by this run
    skipped: int = 0            # complete already (an earlier run)
    failed: list = dataclasses.field(default_factory=list)   # BadRow
    seconds: float = 0.0
    process: int = 0
    processes: int = 1

    @property
    def images_per_s(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def report(self, max_lines: int = 20) -> str:
        who = f"process {self.process} of {self.processes}: " if self.processes > 1 else ""
        lines = [f"{who}{self.done} done, {self.skipped} skipped (complete already), {len(self.failed)} failed; "
                 f"{self.images_per_s:.2f} images/s"]
        lines += [f"  {b}" for b in self.failed[:max_lines]]
        if len(self.failed) > max_lines:
            lines.append(f"  ... and {len(self.failed) - max_lines} more")
        return "\n".join(lines)


# ---------------------------------------------------------------- rows

def read_manifest(path: str, *, base_seed: int = 0) -> tuple[list[Row], list[BadRow]]:
    """(valid rows, bad rows) of a JSONL manifest; every process reads the (small) text in full,
    so all agree on which rows are valid and who owns each."""
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise JobError(f"{path}: cannot read the manifest ({e.strerror or e})") from None
    folder = os.path.dirname(os.path.abspath(path))
    rows, bad, seen = [], [], {}
    for number, obj in jsonl.objects(lines, path, on_bad=lambda n, reason: bad.append(BadRow(n, reason))):
        try:
            row = _row(obj, number, folder, base_seed)
        except JobError as e:
            bad.append(BadRow(number, str(e)))
            continue
        if row.id in seen:
            bad.append(BadRow(number, f"duplicate id {row.id!r} (first on line {seen[row.id]})"))
            continue
        seen[row.id] = number
        rows.append(row)
    return rows, bad


def _row(obj: dict, number: int, folder: str, base_seed: int) -> Row:
    for key in ("image", "instruction"):
        if not isinstance(obj.get(key), str):
            raise JobError(f"missing or non-string field {key!r}")
    rid = str(obj.get("id", number))
    if not ID_PATTERN.fullmatch(rid):
        raise JobError(f"id {rid!r} cannot name a file (letters, digits, '.', '_', '-'; not starting with '.')")
    seed = obj.get("seed", base_seed + number)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 32:
        raise JobError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    scales = {}
    for key in ("text_scale", "image_scale"):
        v = obj.get(key)
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not abs(v) <= MAX_SCALE:
                raise JobError(f"{key} must be a finite number with |value| <= {MAX_SCALE:g}, got {v!r}")
            scales[key] = float(v)
    image = obj["image"] if os.path.isabs(obj["image"]) else os.path.join(folder, obj["image"])
    return Row(number, rid, image, obj["instruction"], seed, where=obj["image"], **scales)


def tfds_rows(spec: str, *, base_seed: int = 0, process_index: int | None = None,
              process_count: int | None = None) -> list[Row]:
    """This process's rows of an edit-pairs dataset, `DATA_DIR:NAME/SPLIT`: record i goes to
    process i % P; images are read (from the record) only when their batch is reached."""
    from ip2p_jax.data import builder as B   # TFDS: only this path needs it

    data_dir, sep, rest = spec.rpartition(":")
    name, slash, split = rest.partition("/")
    if not (sep and data_dir and name and slash and split):
        raise JobError(f"--tfds {spec!r}: expected DATA_DIR:NAME/SPLIT")
    try:
        ds = B.encoded_source(B.open_dataset(data_dir, name), split)
    except (KeyError, ValueError) as e:
        raise JobError(f"--tfds {spec}: {e}") from None
    p = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    rows = []
    for i in range(p, len(ds), count):
        record = ds[i]
        instruction = record["instruction"]
        rows.append(Row(i, f"{split}-{i}", (lambda i=i: ds[i]["input_image"]),
                        instruction.decode() if isinstance(instruction, bytes) else str(instruction),
                        base_seed + i, where=f"{spec} record {i}"))
    return rows


def own_rows(rows: Sequence[Row], process_index: int, process_count: int) -> list[Row]:
    """Valid row i -> process i % P."""
    return list(rows[process_index::process_count])


def is_complete(out: str, row_id: str) -> bool:
    """The sidecar is written after the PNG: both present means the row is done."""
    return os.path.isfile(os.path.join(out, f"{row_id}.json")) and os.path.isfile(os.path.join(out, f"{row_id}.png"))


# ---------------------------------------------------------------- the job

def run_job(pipe: EditPipeline, rows: Sequence[Row], out: str, *, steps: int, sampler: str = "euler_a",
            schedule: str | None = None, text_scale: float | None = None, image_scale: float = 1.5,
            resolution: int | None = None, resize: str = "authors", bad: Sequence[BadRow] = (),
            strict: bool = False, per_device_batch: int = PER_DEVICE_BATCH, rows_are_local: bool = False,
            max_pixels: int = imlib.DEFAULT_MAX_PIXELS, max_edit_pixels: int = imlib.DEFAULT_MAX_EDIT_PIXELS,
            show_progress: bool = True) -> JobSummary:
    """Edit this process's rows into `out`; collective (every process calls it with the same
    arguments). rows: all valid rows (each process takes its own), or with `rows_are_local` this
    process's already (tfds_rows). bad: rows found bad while reading; reported by process 0.
    text_scale None: the model's default (EditPipeline.default_text_scale)."""
    text_scale = pipe.default_text_scale if text_scale is None else text_scale
    check_request(steps=steps, text_scale=text_scale, image_scale=image_scale)
    pipe.plan(sampler, steps, schedule)
    p, count = jax.process_index(), jax.process_count()
    resolution = pipe.native_resolution if resolution is None else resolution
    summary = JobSummary(process=p, processes=count, failed=list(bad) if p == 0 else [])
    if strict and bad:
        raise JobError(f"bad row (--strict): {bad[0]}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
    mine = list(rows) if rows_are_local else own_rows(rows, p, count)
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()

    # Pass 1: skip complete rows, read the headers of the others, group them by edit size.
    groups: dict[tuple[int, int], list[Row]] = {}
    leftovers = _temporaries(out)
    for row in mine:
        if is_complete(out, row.id):
            summary.skipped += 1
            continue
        for tmp in leftovers.get(row.id, ()):   # a killed run's half-written files of this row
            os.unlink(os.path.join(out, tmp))
        try:
            size = _edit_size(row, resize=resize, resolution=resolution, max_pixels=max_pixels,
                              max_edit_pixels=max_edit_pixels)
        except imlib.ImageError as e:
            summary.failed.append(BadRow(row.line, str(e)))
            continue
        groups.setdefault(size, []).append(row)
    if strict:
        _strict_stop(summary, count)

    # Agree on the sizes and on the number of calls per size.
    local_rows = per_device_batch * pipe.num_local_devices
    plan = _agree(groups, local_rows, count)
    total = sum(len(g) for g in groups.values())
    bar = progress(total=total, desc=f"editing (process {p})" if count > 1 else "editing", unit="img",
                   enabled=show_progress)
    try:
        for size, calls in plan:
            group = groups.get(size, [])
            for k in range(calls):
                chunk = group[k * local_rows:(k + 1) * local_rows]
                done = _edit_chunk(pipe, chunk, size, local_rows, out, summary, steps=steps, sampler=sampler,
                                   schedule=schedule, text_scale=text_scale, image_scale=image_scale,
                                   resize=resize, resolution=resolution, max_pixels=max_pixels)
                bar.update(len(chunk))
                if done:
                    bar.set_postfix_str(f"{(summary.done) / (time.perf_counter() - start):.2f} img/s")
                if strict:
                    _strict_stop(summary, count)
    finally:
        bar.close()
    summary.seconds = time.perf_counter() - start
    log.info("%s", summary.report())
    return summary


def _temporaries(out: str) -> dict[str, list[str]]:
    """row id -> the hidden `.ID.png.*.part` / `.ID.json.*.part` files files.atomic_file leaves on a kill."""
    found: dict[str, list[str]] = {}
    for name in os.listdir(out):
        m = re.fullmatch(r"\.(.+)\.(?:png|json)\.[^.]+\.part", name)
        if m:
            found.setdefault(m.group(1), []).append(name)
    return found


def _edit_size(row: Row, *, resize, resolution, max_pixels, max_edit_pixels) -> tuple[int, int]:
    """The row's edit size from its image header alone (no pixels decoded)."""
    source = row.image if isinstance(row.image, str) else io.BytesIO(row.image())
    w, h = imlib.probe_size(source, name=row.where, max_pixels=max_pixels)
    return imlib.edit_size((w, h), mode=resize, resolution=resolution, name=row.where,
                           max_edit_pixels=max_edit_pixels)


def _agree(groups: dict, local_rows: int, count: int) -> list[tuple[tuple[int, int], int]]:
    """[(size, calls)] the same on every process: the union of sizes, each with the most calls
    any process needs."""
    if len(groups) > MAX_SIZES:
        raise JobError(f"{len(groups)} distinct edit sizes: at most {MAX_SIZES} in one job "
                       "(use --resize authors, or split the job)")
    table = np.zeros((MAX_SIZES, 3), np.int64)
    for i, (size, group) in enumerate(sorted(groups.items())):
        table[i] = (*size, -(-len(group) // local_rows))
    if count > 1:
        table = np.asarray(multihost_utils.process_allgather(table)).reshape(count, MAX_SIZES, 3)
    else:
        table = table[None]
    calls: dict[tuple[int, int], int] = {}
    for w, h, n in table.reshape(-1, 3):
        if n:
            calls[(int(w), int(h))] = max(calls.get((int(w), int(h)), 0), int(n))
    return sorted(calls.items())


def _strict_stop(summary: JobSummary, count: int) -> None:
    """With --strict: stop every process together once any has a bad row."""
    n = np.array([len(summary.failed)], np.int64)
    total = int(np.sum(multihost_utils.process_allgather(n))) if count > 1 else int(n[0])
    if total:
        first = summary.failed[0] if summary.failed else "on another process"
        raise JobError(f"bad row (--strict): {first}")


def _edit_chunk(pipe, chunk: list, size, local_rows: int, out: str, summary: JobSummary, *, steps, sampler,
                schedule, text_scale, image_scale, resize, resolution, max_pixels) -> int:
    """Decode and resize `chunk` (this process's rows of one call), edit, write; returns rows written.
    Collective: a process with fewer (or no) rows pads its share of the call."""
    live = []   # (row, resized image)
    for row in chunk:
        try:
            rgb = _decode(row, max_pixels)
            img = imlib.resize_for_edit(rgb, mode=resize, resolution=resolution, name=row.where)
            del rgb
            if img.size != size:
                raise imlib.ImageError(f"{row.where}: edit size {img.size} differs from its header's {size}")
            live.append((row, img))
        except imlib.ImageError as e:
            summary.failed.append(BadRow(row.line, str(e)))
    filler = live[-1][1] if live else Image.new("RGB", size)
    work = [(r, im) for r, im in live if r.instruction != ""]
    ims = [im for _, im in work] + [filler] * (local_rows - len(work))
    texts = [r.instruction for r, _ in work] + [""] * (local_rows - len(work))
    seeds = [r.seed for r, _ in work] + [0] * (local_rows - len(work))
    ts = [r.text_scale if r.text_scale is not None else text_scale for r, _ in work]
    iscale = [r.image_scale if r.image_scale is not None else image_scale for r, _ in work]
    arrays = pipe.edit_local_batch(ims, texts, seeds, ts + [text_scale] * (local_rows - len(work)),
                                   iscale + [image_scale] * (local_rows - len(work)), steps=steps,
                                   sampler=sampler, schedule=schedule)
    results = {r.id: (imlib.from_unit_array(a), t, s) for (r, _), a, t, s in zip(work, arrays, ts, iscale)}
    for row, img in live:
        image, t, s = results.get(row.id, (img, None, None))   # "" instruction: the resized input
        settings = {"id": row.id, "line": row.line, "input": row.where, "instruction": row.instruction,
                    "seed": row.seed, "text_scale": t, "image_scale": s, "steps": steps, "sampler": sampler,
                    "schedule": schedule, "resize": resize, "resolution": resolution if resize == "authors" else None,
                    "size": list(img.size), "model": pipe.source, "dtype": pipe.dtype.name}
        _write(out, row.id, image, settings)
        summary.done += 1
    return len(live)


def _decode(row: Row, max_pixels: int) -> Image.Image:
    if isinstance(row.image, str):
        return imlib.load_image(row.image, max_pixels=max_pixels)
    try:
        with row.open() as im:
            imlib.check_pixels(im.size, max_pixels, name=row.where)
            im.load()
            return imlib.to_rgb(im, name=row.where)
    except (Image.UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise imlib.ImageError(f"{row.where}: cannot decode image ({e.__class__.__name__}: {e})") from None


def _write(out: str, row_id: str, image, settings: dict) -> None:
    """PNG first, then the sidecar that marks the row complete; both atomic (a kill leaves the old
    state or the new, never a truncated file). A PNG without its sidecar is rewritten."""
    with files.atomic_file(os.path.join(out, f"{row_id}.png")) as f:
        image.save(f, format="PNG")
    files.write_json(os.path.join(out, f"{row_id}.json"), settings)


def total_summary(summary: JobSummary) -> tuple[int, int, int]:
    """(done, skipped, failed) over all processes (collective)."""
    mine = np.array([summary.done, summary.skipped, len(summary.failed)], np.int64)
    if summary.processes == 1:
        return tuple(int(x) for x in mine)
    allp = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, 3).sum(0)
    return tuple(int(x) for x in allp)

