"""Writing files so that nothing is lost or half-written: the one helper every writer uses.

    with atomic_file("out/a.png") as f:            # a fresh temporary file beside the target
        image.save(f, format="PNG")                # renamed onto the target only when complete
    write_json("out/a.json", settings, exclusive=True)   # never replaces an existing file

The temporary file is created exclusively (O_EXCL: a name planted in advance, a symlink included,
is never written through) in the target's folder, fsync'ed and renamed, so a crash or kill
leaves either the old file or the new one and, at worst, a hidden `.NAME.*.part` file.
`exclusive=True` claims the target name atomically (a hard link, which fails if the name
exists), so two runs writing into one folder never take the same name.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Iterator

from ip2p_jax.errors import Ip2pError


class OutputError(Ip2pError):
    """An output folder that cannot be written (not a folder, read-only, full)."""


def writable_parent(path: str, error: type[Exception] | None = None) -> str:
    """The nearest existing folder at or above `path` (to be created or not), after checking that it
    is a folder and that a file can be written in it; `error` (default OutputError) names `path`."""
    error = error or OutputError
    parent = os.path.abspath(os.fspath(path))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise error(f"{path}: {parent} is a file, not a folder")
    try:   # os.access is wrong for root and for read-only mounts: try a write
        fd, probe = tempfile.mkstemp(prefix=".ip2p_jax-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise error(f"{path}: cannot write in {parent} ({e.strerror or e})") from None
    return parent


def free_bytes(folder: str) -> int | None:
    """Free bytes for an unprivileged writer in `folder`, or None where statvfs cannot tell (Windows)."""
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def check_output_dir(path: str, *, min_free_bytes: int = 1 << 20) -> None:
    """Refuse, before any work, an output folder (existing or to be created) that cannot be written:
    not a folder, under a file, read-only, or nearly full. Creates nothing."""
    target = os.path.abspath(os.fspath(path))
    if os.path.lexists(target) and not os.path.isdir(target):
        raise OutputError(f"{path}: exists and is not a folder")
    parent = writable_parent(path)
    free = free_bytes(parent)
    if free is not None and free < min_free_bytes:   # None: the writes themselves will tell
        raise OutputError(f"{path}: {parent} has only {free / 1e6:.1f} MB free")


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "wb", *, exclusive: bool = False) -> Iterator[Any]:
    """Yield a new temporary file opened with `mode`; on success it becomes `path`.

    exclusive: raise FileExistsError instead of replacing an existing `path`."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".part", dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)   # mkstemp makes 0600; results get the mode a plain open() gives
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            _claim(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host: the stale test for the lock and owner files that
    record who writes (a workdir lock, a dataset build, a prompt folder being generated)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):   # another user's process; a garbled pid
        return pid > 0
    return True


def _claim(tmp: str, path: str) -> None:
    """Give the finished `tmp` the name `path` unless `path` exists (FileExistsError)."""
    try:
        os.link(tmp, path)            # atomic and fails on an existing name (file or symlink)
        return
    except FileExistsError:
        raise
    except OSError:                   # filesystems without hard links: claim with O_EXCL, then rename
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0), 0o644))
        os.replace(tmp, path)


def write_bytes(path: str, data: bytes, *, exclusive: bool = False) -> None:
    with atomic_file(path, "wb", exclusive=exclusive) as f:
        f.write(data)


def write_text(path: str, text: str, *, exclusive: bool = False) -> None:
    with atomic_file(path, "w", exclusive=exclusive) as f:
        f.write(text)


def write_json(path: str, obj: Any, *, exclusive: bool = False, indent: int | None = 2, **dumps_kwargs) -> None:
    """JSON as the standard defines it: NaN and infinities are refused (ValueError), not written."""
    write_text(path, json.dumps(obj, indent=indent, allow_nan=False, **dumps_kwargs) + "\n", exclusive=exclusive)
