"""JSON Lines input: one JSON object per non-blank line, with errors that name file and line."""
from __future__ import annotations

import json
from typing import Callable, Iterable, Iterator, Optional


def objects(lines: Iterable[str | bytes], where: str, error: type[Exception] = ValueError,
            on_bad: Optional[Callable[[int, str], None]] = None) -> Iterator[tuple[int, dict]]:
    """(line number, object) of every non-blank line; a line that is not a JSON object raises
    `error("<where>:<line>: ...")`, or, with `on_bad`, is passed to on_bad(line number, reason) and skipped."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            reason = None if isinstance(record, dict) else f"expected a JSON object, got {type(record).__name__}"
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            reason = f"not JSON ({e})"
        if reason is None:
            yield number, record
        elif on_bad is None:
            raise error(f"{where}:{number}: {reason}") from None
        else:
            on_bad(number, reason)
