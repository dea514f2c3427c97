"""What an interrupted dataset build leaves in a data dir, and putting it right on the next build or open.

A build works in `<data_dir>/.build-<name>-*` (its `owner.json` names the process) and replaces an
existing dataset by renaming it into `<data_dir>/.old-<name>-*/` first. A kill leaves either a
`.build-*` folder (dataset-sized) or, between the two renames of `--overwrite`, the previous dataset
only in `.old-*`. `clean_builds` removes the folders of builds whose process is gone (a live build's
folder is left alone) and logs what it freed; `recover_old` moves a stranded previous dataset back
(or removes it when the new one is in place), and logs it.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time

from ip2p_jax import files

log = logging.getLogger("ip2p_jax.data.builder")
OWNER = "owner.json"
GRACE_S = 60   # a .build-* folder without owner.json younger than this may be a build just starting


def write_owner(build_dir: str) -> None:
    files.write_json(os.path.join(build_dir, OWNER), {"pid": os.getpid(), "host": socket.gethostname()})


def _abandoned(build_dir: str) -> bool:
    try:
        with open(os.path.join(build_dir, OWNER)) as f:
            owner = json.load(f)
    except (OSError, ValueError):
        try:
            return time.time() - os.path.getmtime(build_dir) > GRACE_S
        except OSError:
            return False
    if owner.get("host") != socket.gethostname():
        return False    # another host's build (a shared filesystem): not ours to judge
    return not files.pid_alive(int(owner.get("pid", -1)))


def _size(path: str) -> int:
    total = 0
    for folder, _, names in os.walk(path):
        for n in names:
            try:
                total += os.lstat(os.path.join(folder, n)).st_size
            except OSError:
                pass
    return total


def clean_builds(data_dir: str) -> list[str]:
    """Remove the `.build-*` folders of interrupted builds in `data_dir`; returns their paths."""
    removed = []
    try:
        names = os.listdir(data_dir)
    except OSError:
        return removed
    for n in sorted(names):
        path = os.path.join(data_dir, n)
        if n.startswith(".build-") and os.path.isdir(path) and not os.path.islink(path) and _abandoned(path):
            size = _size(path)
            shutil.rmtree(path, ignore_errors=True)
            log.warning("removed %s, left by an interrupted dataset build (%.1f MB)", path, size / 1e6)
            removed.append(path)
    return removed


def recover_old(data_dir: str, name: str, final: str) -> list[str]:
    """An interrupted `--overwrite` of dataset `name`: move the previous dataset back to `final` if
    nothing is there, else remove the stranded copy. Returns the `.old-*` folders dealt with."""
    done = []
    try:
        names = sorted(os.listdir(data_dir))
    except OSError:
        return done
    for n in names:
        old = os.path.join(data_dir, n)
        if not (n.startswith(f".old-{name}-") and os.path.isdir(old)):
            continue
        inner = os.path.join(old, os.path.basename(final))
        if os.path.isdir(inner) and not os.path.exists(final):
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.replace(inner, final)
            log.warning("%s: an interrupted --overwrite had left the previous dataset in %s; moved it back",
                        final, old)
        elif os.path.isdir(inner):
            log.warning("removed %s: the previous dataset, left by an --overwrite that completed", old)
        shutil.rmtree(old, ignore_errors=True)
        done.append(old)
    return done
