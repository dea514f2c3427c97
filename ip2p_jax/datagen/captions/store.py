"""Append-only JSONL files that survive being killed at any moment.

Each record is written as one complete line and flushed. A kill can at worst
leave a partial last line (no trailing newline); `recover_jsonl` cuts it off
before the file is appended to again, so it never counts and never merges
with the next record.
"""

from __future__ import annotations

import json
import os

from ip2p_jax import jsonl

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
    try:
        return [record for _, record in jsonl.objects(data[:complete].splitlines(), path)]
    except ValueError as e:
        raise CaptionStageError(f"{e}; refusing to append to this file") from None


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
