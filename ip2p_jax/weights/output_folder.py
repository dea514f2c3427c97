"""Model folders we write (export, convert, the end-of-training export) and what they may replace.

    check_output_folder(out, overwrite=False, protect=[workdir])   # before any model is loaded
    with atomic_folder(out, overwrite=True) as tmp:                # write into tmp; swapped in at the end
        ...

A folder we write carries the marker file MARKER. An existing target is replaced only when it is
empty or carries the marker (and `overwrite` is given for a non-empty one): a folder of the
user's files is refused, never moved or deleted. The current directory, the filesystem root and
any folder holding a `protect` path (the run's workdir) are never targets. Replacing is atomic:
the new folder is written complete beside the target, the old one is renamed aside, the new one
renamed in, and only then is the old one removed.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterable

import numpy as np

from ip2p_jax.files import free_bytes, writable_parent, write_text
from ip2p_jax.weights.naming import WeightsError

MARKER = ".ip2p_jax_model"
MARKER_TEXT = "a model folder written by ip2p_jax; `ip2p export/convert --overwrite` may replace it\n"


def _contains(folder: str, path: str) -> bool:
    """Whether `path` is `folder` or lies inside it (both absolute, symlinks resolved)."""
    folder, path = os.path.realpath(folder), os.path.realpath(path)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_output_folder(path: str, *, overwrite: bool = False, protect: Iterable[str] = (),
                        need_bytes: int = 0) -> str:
    """Refuse (WeightsError naming the path) a target we must not write; returns the absolute path.

    Checks: not the current directory / the root / a folder holding a `protect` path; an existing
    target is a folder that is empty or one of ours (MARKER), and `overwrite` for a non-empty one;
    the nearest existing parent is a writable folder with `need_bytes` free."""
    path = os.path.abspath(os.fspath(path))
    try:
        cwd = os.getcwd()
    except OSError:   # the current folder was removed
        cwd = None
    if (cwd and _contains(path, cwd)) or os.path.dirname(path) == path:
        raise WeightsError(f"{path}: is the current directory or one of its parents; "
                           "write the model into a new folder (e.g. --out ./model)")
    for p in protect:
        if p and _contains(path, os.path.abspath(p)):
            raise WeightsError(f"{path}: holds {os.path.abspath(p)}; write the model into a folder of its own")
    if os.path.lexists(path):
        if os.path.islink(path):
            raise WeightsError(f"{path}: is a symbolic link; give the folder itself, or another output")
        if not os.path.isdir(path):
            raise WeightsError(f"{path}: exists and is not a folder; choose another output")
        try:
            entries = os.listdir(path)
        except OSError as e:
            raise WeightsError(f"{path}: cannot read the folder ({e.strerror or e})") from None
        if entries and MARKER not in entries:
            raise WeightsError(f"{path}: not empty and not a model folder written by ip2p_jax (no {MARKER}); "
                               "refusing to replace it - choose a new or empty folder")
        if entries and not overwrite:
            raise WeightsError(f"{path}: already exists (choose another output, or --overwrite to replace it)")
    parent = writable_parent(path, WeightsError)
    if need_bytes:
        free = free_bytes(parent)
        if free is not None and free < need_bytes:   # None: the write itself will tell
            raise WeightsError(f"{path}: needs about {need_bytes / 1e6:.1f} MB, {parent} has "
                               f"{free / 1e6:.1f} MB free")
    return path


def check_finite(params_by_name: dict, where: str) -> None:
    """Refuse to write weights holding NaN or infinities (WeightsError naming the tensors)."""
    bad = []
    for name, tree in params_by_name.items():
        for keypath, leaf in _leaves(tree):
            a = np.asarray(leaf)
            if a.dtype.kind == "f" or a.dtype.name == "bfloat16":
                if not np.isfinite(a.astype(np.float32)).all():
                    bad.append(f"{name}/{keypath}")
    if bad:
        raise WeightsError(f"{where}: refusing to write non-finite weights: {len(bad)} tensors hold NaN or "
                           f"infinity ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); the training "
                           "run diverged or the dtype overflowed")


def _leaves(tree, prefix: str = ""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, f"{prefix}/{k}" if prefix else str(k))
    else:
        yield prefix, tree


@contextlib.contextmanager
def atomic_folder(path: str, overwrite: bool = False, protect: Iterable[str] = (), need_bytes: int = 0):
    """Yield a temporary folder beside `path` (MARKER already in it); on success it replaces `path`.

    A crash leaves `path` as it was (and at worst a `.<name>.tmp-*` folder beside it). OSErrors
    become one-line WeightsErrors naming the path."""
    path = check_output_folder(path, overwrite=overwrite, protect=protect, need_bytes=need_bytes)
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like any folder
        write_text(os.path.join(tmp, MARKER), MARKER_TEXT)
    except OSError as e:
        raise WeightsError(f"{path}: cannot write the model folder ({e.strerror or e})") from None
    try:
        yield tmp
        check_output_folder(path, overwrite=overwrite, protect=protect)   # still ours to replace
        old = None
        if os.path.lexists(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
            os.rename(path, os.path.join(old, "x"))
        try:
            os.rename(tmp, path)
        except OSError:
            if old:   # put the previous folder back
                os.rename(os.path.join(old, "x"), path)
                os.rmdir(old)
            raise
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise WeightsError(f"{e.filename or path}: cannot write the model folder ({e.strerror or e})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
