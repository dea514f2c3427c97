"""Readers for the on-disk edit-pair formats (authors', parquet, jsonl, MagicBrush), one pair at a time.

Each source has two passes:
  `plan()`  cheap (text only): yields the prompt id of every candidate pair, to size the splits;
  `scan()`  yields `Pair`s (images as file paths or encoded bytes, not yet checked) and
            `Rejection`s for items that cannot even be parsed.
`load_pair(pair)` then reads and checks the images (kept exactly as encoded).
`units()` / `scan_unit(unit)` cut `scan()` into independent pieces (files, or ranges of prompt
folders) for a parallel build; `scan()` is their concatenation, in order.

Split of a pair = a stable hash of its prompt id (90/5/5), so all seeds of a prompt share a split.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
from typing import Iterator

import pyarrow.parquet as pq
from PIL import Image

from ip2p_jax.errors import Ip2pError

SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = (0.90, 0.05, 0.05)
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")


class SourceError(Ip2pError):
    """The source as a whole is unusable (missing, empty, malformed index file)."""


class Reject(Exception):
    """One item is unusable: `kind` (a short category for the summary) and `detail`."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind} ({detail})" if detail else kind)
        self.kind, self.detail = kind, detail


@dataclasses.dataclass
class Rejection:
    item: str    # file, file#row, file:line or dir/seed
    kind: str    # e.g. "corrupt image", "missing image file", "malformed JSON line"
    detail: str = ""

    def __str__(self):
        return f"{self.item}: {self.kind}" + (f" ({self.detail})" if self.detail else "")


@dataclasses.dataclass
class Pair:
    id: str                   # unique within the dataset, stable across rebuilds
    prompt_id: str            # pairs sharing it (seeds of one prompt) land in one split
    instruction: str
    input_image: bytes | str  # encoded bytes, or a file path
    edited_image: bytes | str
    input_caption: str = ""
    edited_caption: str = ""
    turn_index: int | None = None            # MagicBrush: the turn of its editing session (1, 2, ...)
    mask_image: bytes | str | None = None    # MagicBrush: the annotated edit region (encoded, as given)


def prompt_hash(prompt_id: str) -> int:
    """Stable unsigned 64-bit hash of a prompt id (same on every machine and Python run)."""
    return int.from_bytes(hashlib.sha256(prompt_id.encode("utf-8")).digest()[:8], "big")


def split_of(prompt_id: str) -> str:
    u = prompt_hash(prompt_id) / 2.0**64
    edge = 0.0
    for name, fraction in zip(SPLITS, SPLIT_FRACTIONS):
        edge += fraction
        if u < edge:
            return name
    return SPLITS[-1]


# ---------------------------------------------------------------- images

def check_image(data: bytes) -> str:
    """Decode `data` fully enough to catch corrupt or truncated files; returns the format."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            if fmt not in IMAGE_FORMATS:
                raise Reject("unsupported image format", f"{fmt}; expected {', '.join(IMAGE_FORMATS)}")
            if fmt == "JPEG":  # decoding at 1/8 scale still reads every entropy-coded byte
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
    except Reject:
        raise
    except Image.UnidentifiedImageError:
        raise Reject("corrupt image", "not an image file PIL can identify") from None
    except Exception as e:
        raise Reject("corrupt image", f"{type(e).__name__}: {e}") from None
    return fmt


def read_image(ref: bytes | str, what: str) -> bytes:
    """The encoded image bytes for `ref` (bytes, or a path), checked; Reject names `what`."""
    if isinstance(ref, str):
        try:
            with open(ref, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise Reject("missing image file", f"{what} {ref}") from None
        except OSError as e:
            raise Reject("unreadable image file", f"{what} {ref}: {e.strerror or e}") from None
    else:
        data = ref
    if not data:
        raise Reject("empty image", what)
    try:
        check_image(data)
    except Reject as e:
        where = f"{what} {ref}" if isinstance(ref, str) else what
        raise Reject(e.kind, f"{where}: {e.detail}") from None
    return data


def load_pair(pair: Pair) -> dict:
    """The example dict stored in the dataset (images read and checked), or raise Reject."""
    if not pair.instruction.strip():
        raise Reject("empty instruction")
    extra = {}
    if pair.turn_index is not None:   # MagicBrush: turn and mask kept as features
        extra = {"turn_index": int(pair.turn_index),
                 "mask_image": b"" if pair.mask_image is None else read_image(pair.mask_image, "mask image")}
    return {
        "id": pair.id,
        "prompt_id": pair.prompt_id,
        "instruction": pair.instruction,
        "input_caption": pair.input_caption,
        "edited_caption": pair.edited_caption,
        "input_image": read_image(pair.input_image, "input image"),
        "edited_image": read_image(pair.edited_image, "edited image"),
        **extra,
    }


def load_or_reject(pair: Pair) -> dict | Rejection:
    """`load_pair`, with an unusable pair returned as its Rejection."""
    try:
        return load_pair(pair)
    except Reject as e:
        return Rejection(pair.id, e.kind, e.detail)


# ---------------------------------------------------------------- authors' layout

class AuthorsSource:
    """`seeds.json` (sorted [[dir, [seeds...]], ...]); `<dir>/prompt.json` with keys
    input / edit / output; `<dir>/<seed>_0.jpg` (input) and `<seed>_1.jpg` (edited).
    Without seeds.json the seeds are listed from the `<seed>_0.jpg` files."""

    format = "authors"
    unit_prompts = 1000  # prompts per unit of a parallel build

    def __init__(self, path: str):
        self.root = os.fspath(path)
        self._cached = None
        if not os.path.isdir(self.root):
            raise SourceError(f"{self.root}: not a directory (the authors' layout is a folder "
                              "with seeds.json and one sub-folder per prompt)")

    def _seeds(self) -> list[tuple[str, list[int]]]:
        index = os.path.join(self.root, "seeds.json")
        if os.path.exists(index):
            try:
                with open(index) as f:
                    seeds = json.load(f)
                return [(str(name), [int(s) for s in ss]) for name, ss in seeds]
            except (ValueError, TypeError) as e:
                raise SourceError(f"{index}: malformed (expected a list of [dir, [seeds...]]): {e}") from None
        listing = []
        for name in sorted(os.listdir(self.root)):
            d = os.path.join(self.root, name)
            if os.path.isdir(d):
                found = sorted(int(m.group(1)) for f in os.listdir(d) if (m := re.fullmatch(r"(\d+)_0\.jpg", f)))
                if found:
                    listing.append((name, found))
        return listing

    def _listing(self) -> list[tuple[str, list[int]]]:
        if self._cached is None:
            self._cached = self._seeds()
        return self._cached

    def __getstate__(self):  # a parallel build ships the source to workers: not its listing
        return dict(self.__dict__, _cached=None)

    def plan(self) -> Iterator[str]:
        for name, seeds in self._listing():
            for _ in seeds:
                yield name

    def units(self) -> list[tuple[int, int]]:
        """Independent pieces of the source (index ranges of prompts), for parallel builds."""
        n = len(self._listing())
        return [(i, min(n, i + self.unit_prompts)) for i in range(0, n, self.unit_prompts)]

    def scan(self) -> Iterator[Pair | Rejection]:
        for unit in self.units():
            yield from self.scan_unit(unit)

    def scan_unit(self, unit: tuple[int, int]) -> Iterator[Pair | Rejection]:
        for name, seeds in self._listing()[unit[0]:unit[1]]:
            d = os.path.join(self.root, name)
            prompt_file = os.path.join(d, "prompt.json")
            try:
                with open(prompt_file) as f:
                    prompt = json.load(f)
                if not isinstance(prompt, dict) or not isinstance(prompt.get("edit"), str):
                    raise ValueError("no 'edit' text")
                problem = None
            except FileNotFoundError:
                problem = Rejection("", "missing prompt.json", prompt_file)
            except (OSError, ValueError) as e:
                problem = Rejection("", "malformed prompt.json", f"{prompt_file}: {e}")
            for seed in seeds:
                item = f"{name}/{seed}"
                if problem:
                    yield dataclasses.replace(problem, item=item)
                    continue
                yield Pair(id=item, prompt_id=name, instruction=prompt["edit"],
                           input_caption=str(prompt.get("input") or ""),
                           edited_caption=str(prompt.get("output") or ""),
                           input_image=os.path.join(d, f"{seed}_0.jpg"),
                           edited_image=os.path.join(d, f"{seed}_1.jpg"))


# ---------------------------------------------------------------- parquet

# our field <- accepted column names (Hugging Face dataset first, then diffusers' / our own).
PARQUET_COLUMNS = {
    "input_image": ("original_image", "input_image"),
    "edited_image": ("edited_image",),
    "instruction": ("edit_prompt", "instruction"),
    "input_caption": ("original_prompt", "input_caption"),
    "edited_caption": ("edited_prompt", "edited_caption"),
}
PARQUET_REQUIRED = ("input_image", "edited_image", "instruction")
TEXT_FIELDS = ("instruction", "input_caption", "edited_caption")


def _files(path: str, suffix: str, what: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise SourceError(f"{path}: no such file or directory")
    found = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith(suffix))
    if not found:
        raise SourceError(f"{path}: no {what} files (*{suffix}) found")
    return found


def _text_prompt_id(row: dict) -> str:
    """Parquet/diffusers rows carry no prompt index: the prompt is its text triple."""
    key = "\x1f".join(row.get(k) or "" for k in ("input_caption", "instruction", "edited_caption"))
    return f"p{prompt_hash(key):016x}"


class _FileSource:
    """A source read file by file (`self.files` under `self.root`); subclasses define scan_unit."""

    root: str
    files: list[str]

    def _name(self, file: str) -> str:
        return os.path.relpath(file, self.root) if os.path.isdir(self.root) else os.path.basename(file)

    def units(self) -> list[str]:
        """Independent pieces of the source (its files), for parallel builds."""
        return list(self.files)

    def scan(self) -> Iterator[Pair | Rejection]:
        for file in self.files:
            yield from self.scan_unit(file)

    def scan_unit(self, file: str) -> Iterator[Pair | Rejection]:
        raise NotImplementedError


class ParquetSource(_FileSource):
    """Parquet files with the Hugging Face columns (original_prompt, original_image, edit_prompt,
    edited_prompt, edited_image) or diffusers' (input_image, edit_prompt, edited_image). Image
    cells are `{bytes, path}` structs or plain binary; a path-only cell is read relative to the file."""

    format = "parquet"
    batch_rows = 64
    columns = PARQUET_COLUMNS      # our field <- accepted column names
    required = PARQUET_REQUIRED
    plan_fields = TEXT_FIELDS      # what plan() reads to compute the prompt id
    expected = "original_image/input_image, edit_prompt, edited_image"

    def __init__(self, path: str):
        self.root = os.fspath(path)
        self.files = _files(self.root, ".parquet", "parquet")
        self._columns: dict[str, dict[str, str] | Rejection] = {}

    def _mapping(self, file: str) -> dict[str, str] | Rejection:
        """field -> column for `file`, or a Rejection of the whole file."""
        if file not in self._columns:
            try:
                meta = pq.read_metadata(file)
                names = set(meta.schema.to_arrow_schema().names)  # top-level columns
                mapping = {f: next((c for c in cols if c in names), None) for f, cols in self.columns.items()}
                missing = [self.columns[f][0] for f in self.required if mapping[f] is None]
                if missing:
                    self._columns[file] = Rejection(
                        self._name(file), "missing columns", f"{missing}; {meta.num_rows} rows skipped; "
                        f"has {sorted(names)}; expected {self.expected}")
                else:
                    self._columns[file] = {f: c for f, c in mapping.items() if c is not None}
            except Exception as e:
                self._columns[file] = Rejection(self._name(file), "unreadable parquet file", f"{type(e).__name__}: {e}")
        return self._columns[file]

    def _rows(self, file: str, fields: tuple[str, ...]) -> Iterator[dict]:
        mapping = self._mapping(file)
        cols = {f: mapping[f] for f in fields if f in mapping}
        with pq.ParquetFile(file) as pf:
            for batch in pf.iter_batches(batch_size=self.batch_rows, columns=list(dict.fromkeys(cols.values()))):
                data = {f: batch.column(c).to_pylist() for f, c in cols.items()}
                for i in range(batch.num_rows):
                    yield {f: v[i] for f, v in data.items()}

    def plan(self) -> Iterator[str]:
        for file in self.files:
            if isinstance(self._mapping(file), Rejection):
                continue
            try:
                for row in self._rows(file, self.plan_fields):
                    yield self._prompt_id(row)
            except Exception:
                continue  # reported by scan()

    def _prompt_id(self, row: dict) -> str:
        return _text_prompt_id(row)

    def _image(self, cell, file: str, what: str) -> bytes | str:
        if isinstance(cell, dict):
            if cell.get("bytes"):
                return cell["bytes"]
            if cell.get("path"):
                return os.path.join(os.path.dirname(file), cell["path"])
            raise Reject("bad image cell", f"{what}: neither bytes nor path")
        if isinstance(cell, (bytes, bytearray)):
            return bytes(cell)
        raise Reject("bad image cell", f"{what} is {type(cell).__name__}, expected a {{bytes, path}} struct or binary")

    def scan_unit(self, file: str) -> Iterator[Pair | Rejection]:
        mapping = self._mapping(file)
        if isinstance(mapping, Rejection):
            yield mapping
            return
        name = self._name(file)
        row_no = -1
        try:
            for row_no, row in enumerate(self._rows(file, tuple(self.columns))):
                item = f"{name}#{row_no}"
                try:
                    yield self._pair(item, row, file)
                except Reject as e:
                    yield Rejection(item, e.kind, e.detail)
        except Exception as e:
            yield Rejection(f"{name}#{row_no + 1}", "unreadable parquet data", f"{type(e).__name__}: {e}")

    def _pair(self, item: str, row: dict, file: str) -> Pair:
        texts = {f: row.get(f) or "" for f in TEXT_FIELDS}
        if not all(isinstance(v, str) for v in texts.values()):
            raise Reject("bad prompt cell", "a prompt column is not text")
        return Pair(id=item, prompt_id=_text_prompt_id(texts), **texts,
                    input_image=self._image(row["input_image"], file, "input image"),
                    edited_image=self._image(row["edited_image"], file, "edited image"))


# ---------------------------------------------------------------- MagicBrush

MAGICBRUSH_COLUMNS = {
    "session": ("img_id",),
    "turn_index": ("turn_index",),
    "input_image": ("source_img",),
    "mask_image": ("mask_img",),
    "instruction": ("instruction",),
    "edited_image": ("target_img",),
}
MAGICBRUSH_REQUIRED = ("session", "turn_index", "input_image", "instruction", "edited_image")


class MagicBrushSource(ParquetSource):
    """MagicBrush's parquet files (as the Hugging Face dataset osunlp/MagicBrush stores them):
    img_id, turn_index, source_img, mask_img, instruction, target_img; images are {bytes, path}
    structs or plain binary. Each row is one turn of an editing session: the session (img_id) is
    the prompt id, so all turns of one image land in one split; turn_index and the mask (encoded as
    given; b"" where a file has no mask_img column) are kept as features. A row without its source
    or target image is rejected, naming the file, row, session and turn."""

    format = "magicbrush"
    columns = MAGICBRUSH_COLUMNS
    required = MAGICBRUSH_REQUIRED
    plan_fields = ("session",)
    expected = "img_id, turn_index, source_img, mask_img, instruction, target_img"

    def _prompt_id(self, row: dict) -> str:
        return str(row.get("session"))

    def _pair(self, item: str, row: dict, file: str) -> Pair:
        session, turn = row.get("session"), row.get("turn_index")
        if session is None or str(session) == "":
            raise Reject("missing img_id")
        if isinstance(turn, bool) or not isinstance(turn, int):
            raise Reject("bad turn_index", f"img_id {session}: {turn!r} is not an integer")
        where = f"img_id {session} turn {turn}"
        for field, column in (("input_image", "source_img"), ("edited_image", "target_img")):
            cell = row.get(field)
            if cell is None or (isinstance(cell, dict) and not cell.get("bytes") and not cell.get("path")):
                kind = "missing target image" if field == "edited_image" else "missing source image"
                raise Reject(kind, f"{where}: {column} is empty")
        if not isinstance(row.get("instruction"), str):
            raise Reject("bad prompt cell", f"{where}: instruction is not text")
        mask = row.get("mask_image")
        return Pair(id=f"{session}-{turn}", prompt_id=str(session), instruction=row["instruction"],
                    input_image=self._image(row["input_image"], file, f"{where} source_img"),
                    edited_image=self._image(row["edited_image"], file, f"{where} target_img"),
                    turn_index=turn, mask_image=None if mask is None else self._image(mask, file, f"{where} mask_img"))


# ---------------------------------------------------------------- jsonl

class JsonlSource(_FileSource):
    """One JSON object per line: input_image, edited_image (paths relative to the .jsonl file),
    instruction, optional input_caption / edited_caption, optional prompt_id (default: the
    input image path, so all edits of one input image share a split)."""

    format = "jsonl"

    def __init__(self, path: str):
        self.root = os.fspath(path)
        self.files = _files(self.root, ".jsonl", "jsonl")

    def _records(self, file: str) -> Iterator[tuple[str, dict | Rejection]]:
        name = self._name(file)
        try:
            with open(file, encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    item = f"{name}:{line_no}"
                    try:
                        obj = json.loads(line)
                    except ValueError as e:
                        yield item, Rejection(item, "malformed JSON line", str(e))
                        continue
                    if not isinstance(obj, dict):
                        yield item, Rejection(item, "not a JSON object", type(obj).__name__)
                        continue
                    missing = [k for k in ("input_image", "edited_image", "instruction") if not isinstance(obj.get(k), str)]
                    if missing:
                        yield item, Rejection(item, "missing field", f"{missing} missing or not text")
                        continue
                    yield item, obj
        except (OSError, UnicodeDecodeError) as e:
            yield name, Rejection(name, "unreadable file", str(e))

    @staticmethod
    def _prompt_id(obj: dict) -> str:
        return str(obj.get("prompt_id") or obj["input_image"])

    def plan(self) -> Iterator[str]:
        for file in self.files:
            for _, obj in self._records(file):
                if isinstance(obj, dict):
                    yield self._prompt_id(obj)

    def scan_unit(self, file: str) -> Iterator[Pair | Rejection]:
        base = os.path.dirname(os.path.abspath(file))
        for item, obj in self._records(file):
            if isinstance(obj, Rejection):
                yield obj
                continue
            yield Pair(id=item, prompt_id=self._prompt_id(obj), instruction=obj["instruction"],
                       input_caption=str(obj.get("input_caption") or ""),
                       edited_caption=str(obj.get("edited_caption") or ""),
                       input_image=os.path.join(base, obj["input_image"]),
                       edited_image=os.path.join(base, obj["edited_image"]))


FORMATS = {"authors": AuthorsSource, "parquet": ParquetSource, "jsonl": JsonlSource, "magicbrush": MagicBrushSource}


def open_source(fmt: str, path: str):
    if fmt not in FORMATS:
        raise SourceError(f"unknown source format {fmt!r} (expected one of {', '.join(FORMATS)})")
    return FORMATS[fmt](path)
