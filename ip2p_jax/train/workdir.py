"""A run's workdir: created with clear errors, locked against a second trainer, its config.json.

    with WorkdirLock(workdir):       # process 0 holds <workdir>/train.lock (PID + host)
        ...                          # restore, then write_config(config, workdir)

The lock file is claimed atomically (O_EXCL). A lock whose PID is dead on this host is stale (a
killed trainer) and is taken over; one held by a live process, or from another host, refuses the
second trainer with a message naming the holder and the file. `config.json` is written only after a
successful restore; the previous one is kept beside it as `config.previous.json`.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time

import jax

from ip2p_jax import files
from ip2p_jax.errors import Ip2pError

log = logging.getLogger("ip2p_jax.train")
LOCK = "train.lock"
CONFIG = "config.json"
PREVIOUS_CONFIG = "config.previous.json"


class WorkdirError(Ip2pError):
    """A workdir that cannot be used: not a folder, not writable, or in use by another trainer."""


def os_error(path: str, e: OSError, what: str) -> WorkdirError:
    return WorkdirError(f"{e.filename or path}: {what} ({e.strerror or e})")


def make_workdir(workdir: str) -> str:
    workdir = os.path.abspath(os.fspath(workdir))
    if os.path.lexists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f"--workdir {workdir}: exists and is not a folder")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise os_error(workdir, e, "cannot create the --workdir folder") from None
    return workdir


class WorkdirLock:
    """Process 0's lock on a workdir (other processes hold nothing)."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK)
        self.held = False

    def __enter__(self):
        if jax.process_index() == 0:
            self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        for _ in range(3):
            try:
                files.write_json(self.path, me, exclusive=True)
                self.held = True
                return
            except FileExistsError:
                pass
            except OSError as e:
                raise os_error(self.path, e, "cannot write the workdir lock (is --workdir writable?)") from None
            holder = self._holder()
            if holder is None:            # vanished or unreadable between the two calls: try again
                continue
            if holder.get("host") == me["host"] and not files.pid_alive(int(holder.get("pid", -1))):
                log.warning("%s: stale lock of process %s (no longer running) on this host; taking it over",
                            self.path, holder.get("pid"))
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
                continue
            raise WorkdirError(f"{os.path.dirname(self.path)}: in use by another trainer (process "
                               f"{holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}); wait for "
                               f"it to finish or use another --workdir (remove {self.path} only if that "
                               f"process is gone)")
        raise WorkdirError(f"{self.path}: cannot take the workdir lock")

    def _holder(self):
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):   # half-written by a killed trainer: stale only if old
            try:
                if time.time() - os.path.getmtime(self.path) > 60:
                    return {"pid": -1, "host": socket.gethostname()}
            except OSError:
                return None
            return {"pid": "?", "host": "?", "since": "just now"}

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                os.unlink(self.path)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    log.warning("%s: could not remove the lock (%s)", self.path, e)


def config_json(config) -> dict:
    return json.loads(config.to_json_best_effort(sort_keys=True))


def read_config(workdir: str):
    path = os.path.join(workdir, CONFIG)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("%s: unreadable (%s)", path, e)
        return None


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """`key: old -> new` for every setting that differs (nested keys dotted)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<unset>"), new.get(k, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{k}.")
        elif json.dumps(a) != json.dumps(b):   # (NaN equals NaN here)
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def write_config(config, workdir: str) -> None:
    """Process 0: <workdir>/config.json (the previous one, if different, kept as config.previous.json)."""
    if jax.process_index() != 0:
        return
    path = os.path.join(workdir, CONFIG)
    new = config.to_json_best_effort(indent=2, sort_keys=True) + "\n"   # (a NaN setting is written as NaN)
    try:
        old = None
        if os.path.exists(path):
            with open(path) as f:
                old = f.read()
        if old is not None and old != new:
            files.write_text(os.path.join(workdir, PREVIOUS_CONFIG), old)
        files.write_text(path, new)
    except OSError as e:
        raise os_error(path, e, "cannot write the run config") from None
