"""The one progress helper: a tqdm bar when wanted, a silent stand-in otherwise.

    with progress(total=steps, initial=start, desc="editor", unit="step", enabled=show) as bar:
        bar.update(1); bar.set_postfix_str("loss 0.12")

`bar.write(msg)` prints above the bar (or through logging when the bar is off), so log lines and
bars never tear each other.
"""
from __future__ import annotations

import logging

from tqdm.auto import tqdm

log = logging.getLogger(__name__)


class _Silent:
    """What `progress(enabled=False)` returns: the bar's methods, doing nothing but logging writes."""

    def __init__(self, total=None, initial=0):
        self.total, self.n = total, initial

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def set_description(self, desc: str = "", refresh: bool = True) -> None:
        pass

    def write(self, msg: str) -> None:
        log.info(msg)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def progress(iterable=None, *, total: int | None = None, initial: int = 0, desc: str = "", unit: str = "it",
             enabled: bool = True, leave: bool = True):
    """A tqdm bar over `iterable` (or with `total`), or a silent stand-in when not `enabled`.

    Iterating a disabled bar yields the iterable unchanged."""
    if not enabled:
        return iter(iterable) if iterable is not None else _Silent(total, initial)
    return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, leave=leave, dynamic_ncols=True)
