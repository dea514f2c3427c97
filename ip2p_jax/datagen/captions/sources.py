"""Input captions: reading them from text, JSONL or parquet, and the authors' partitioning.

Formats (chosen by extension):
  .txt            one caption per line, no URLs (url = "")
  .jsonl          one JSON object per line with a caption field and optionally a URL field
  .parquet / dir  parquet file or folder of parquet files (e.g. LAION: columns TEXT, URL)
Blank or missing captions are skipped; captions are otherwise used as written.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional

import numpy as np
import pyarrow.dataset as ds

from ip2p_jax import jsonl

from .errors import CaptionStageError

CAPTION_COLUMNS = ("caption", "TEXT", "text", "input")  # tried in order when none is named
URL_COLUMNS = ("url", "URL")


class CaptionRow(NamedTuple):
    caption: str
    url: str  # "" when the source has none; only non-empty URLs take part in deduplication


def _pick_column(names, wanted: Optional[str], candidates, what: str, path: str,
                 required: bool) -> Optional[str]:
    if wanted is not None:
        if wanted not in names:
            raise CaptionStageError(f"{path}: unknown {what} column '{wanted}' (columns: {', '.join(names)})")
        return wanted
    found = next((c for c in candidates if c in names), None)
    if found is None and required:
        raise CaptionStageError(f"{path}: no {what} column among {', '.join(names)}; "
                                f"name it with --{what}-column")
    return found


def _rows(path: str, captions, urls) -> list[CaptionRow]:
    rows = []
    for i, caption in enumerate(captions):
        if caption is None:
            continue
        if not isinstance(caption, str):
            raise CaptionStageError(f"{path}: caption of row {i} is {type(caption).__name__}, not text")
        if caption.strip():
            url = urls[i] if urls is not None else ""
            rows.append(CaptionRow(caption, "" if url is None else str(url)))
    return rows


def _read_text(path: str) -> list[CaptionRow]:
    with open(path, encoding="utf-8") as f:
        return _rows(path, [line.rstrip("\r\n") for line in f], None)


def _read_jsonl(path: str, caption_column, url_column) -> list[CaptionRow]:
    captions, urls = [], []
    caption_key = url_key = None
    with open(path, encoding="utf-8") as f:
        for number, record in jsonl.objects(f, path, CaptionStageError):
            if caption_key is None:  # the first record decides the columns
                names = list(record)
                caption_key = _pick_column(names, caption_column, CAPTION_COLUMNS, "caption", path, True)
                url_key = _pick_column(names, url_column, URL_COLUMNS, "url", path, False)
            if caption_key not in record:
                raise CaptionStageError(f"{path}:{number}: no '{caption_key}' field")
            captions.append(record[caption_key])
            urls.append(record.get(url_key, "") if url_key else "")
    return _rows(path, captions, urls)


def _read_parquet(path: str, caption_column, url_column) -> list[CaptionRow]:
    try:
        dataset = ds.dataset(path, format="parquet")
        names = dataset.schema.names
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise CaptionStageError(f"{path}: cannot read as parquet: {e}") from None
    caption_key = _pick_column(names, caption_column, CAPTION_COLUMNS, "caption", path, True)
    url_key = _pick_column(names, url_column, URL_COLUMNS, "url", path, False)
    table = dataset.to_table(columns=[caption_key] + ([url_key] if url_key else []))
    urls = table.column(url_key).to_pylist() if url_key else None
    return _rows(path, table.column(caption_key).to_pylist(), urls)


def read_captions(path: str, caption_column: Optional[str] = None,
                  url_column: Optional[str] = None) -> list[CaptionRow]:
    """All usable captions of `path` in file order. Columns default to the first of
    CAPTION_COLUMNS / URL_COLUMNS present; a named column that is absent is an error."""
    if not os.path.exists(path):
        raise CaptionStageError(f"captions file {path} does not exist")
    lower = path.lower()
    if os.path.isdir(path) or lower.endswith((".parquet", ".pq")):
        return _read_parquet(path, caption_column, url_column)
    if lower.endswith((".jsonl", ".json")):
        return _read_jsonl(path, caption_column, url_column)
    if lower.endswith(".txt"):
        if caption_column or url_column:
            raise CaptionStageError(f"{path}: a .txt file has no columns (one caption per line)")
        return _read_text(path)
    raise CaptionStageError(f"{path}: unknown captions format; expected .txt, .jsonl or .parquet")


def select_partition(rows: list, seed: int, num_partitions: int, partition: int) -> list:
    """The authors' split: shuffle all rows with numpy's legacy RNG seeded by `seed`, cut the
    permutation into `num_partitions` near-equal parts (np.array_split), keep part `partition`.
    Every process must use the same `seed` and `num_partitions`."""
    if num_partitions < 1 or not 0 <= partition < num_partitions:
        raise CaptionStageError(f"partition {partition} is outside 0..{num_partitions - 1}")
    order = np.random.RandomState(seed).permutation(len(rows))
    return [rows[i] for i in np.array_split(order, num_partitions)[partition]]
