"""JSON Lines input: one JSON object per non-blank line, with errors that name file and line."""
from __future__ import annotations

import json
from typing import Iterable, Iterator


def objects(lines: Iterable[str | bytes], where: str,
            error: type[Exception] = ValueError) -> Iterator[tuple[int, dict]]:
    """(line number, object) of every non-blank line; a line that is not a JSON object raises
    `error("<where>:<line>: ...")`."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise error(f"{where}:{number}: not JSON ({e})") from None
        if not isinstance(record, dict):
            raise error(f"{where}:{number}: expected a JSON object, got {type(record).__name__}")
        yield number, record
