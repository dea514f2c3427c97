"""Append-only JSONL files that survive being killed at any moment.

Each record is written as one complete line and flushed. A kill can at worst
leave a partial last line (no trailing newline); `recover_jsonl` cuts it off
before the file is appended to again, so it never counts and never merges
with the next record.
"""

from __future__ import annotations

import json
import os

from .errors import CaptionStageError


def recover_jsonl(path: str) -> list[dict]:
    """The complete records of `path` ([] if it does not exist), after truncating a partial
    last line in place. A broken line elsewhere is an error: that file was not ours."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    complete = data.rfind(b"\n") + 1
    if complete < len(data):
        with open(path, "r+b") as f:
            f.truncate(complete)
    records = []
    for number, line in enumerate(data[:complete].splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CaptionStageError(f"{path}:{number}: not a JSON line; refusing to append to this file") from None
        if not isinstance(record, dict):
            raise CaptionStageError(f"{path}:{number}: expected a JSON object")
        records.append(record)
    return records


class JsonlAppender:
    """Appends one JSON object per line; each write is a single flushed line."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
