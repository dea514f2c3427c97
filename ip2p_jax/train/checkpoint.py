"""Orbax checkpoints of a run: the train state (global arrays) and each host's data-iterator state.

`<workdir>/checkpoints/<step>/{state, data}`. Orbax writes a step into a temporary folder and
renames it when complete, so a crash or SIGKILL during a save leaves the previous steps usable
(the leftover temporary folder is removed when the manager is next opened).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers

from ip2p_jax.errors import Ip2pError


class CheckpointError(Ip2pError):
    """A checkpoint that does not fit this run."""


class ProcessStateHandler(ocp.CheckpointHandler):
    """One JSON file per process: `process_<i>-of-<n>.json` (a grain-style iterator state: dict or bytes)."""

    def _path(self, directory: epath.Path) -> epath.Path:
        return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

    def save(self, directory: epath.Path, args: "ProcessStateSave"):
        state = args.state
        doc = ({"bytes": state.decode("latin-1")} if isinstance(state, (bytes, bytearray))
               else {"json": state})
        self._path(directory).write_text(json.dumps(doc))

    def restore(self, directory: epath.Path, args: Optional["ProcessStateRestore"] = None):
        path = self._path(directory)
        if not path.exists():
            raise CheckpointError(f"{path}: no data-iterator state for this process (was the checkpoint written "
                             f"by a different number of processes?)")
        doc = json.loads(path.read_text())
        return doc["bytes"].encode("latin-1") if "bytes" in doc else doc["json"]

    def metadata(self, directory: epath.Path):
        return None

    def finalize(self, directory: epath.Path):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(ProcessStateHandler, for_save=True)
@dataclasses.dataclass
class ProcessStateSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(ProcessStateHandler, for_restore=True)
@dataclasses.dataclass
class ProcessStateRestore(ocp.args.CheckpointArgs):
    pass


class Checkpointer:
    """Save every `every_steps` (and when forced), keep the last `keep` and every step of `keep_steps`,
    restore the latest."""

    def __init__(self, directory: str, every_steps: int = 1, keep: Optional[int] = None, async_save: bool = True,
                 read_only: bool = False, keep_steps: tuple = ()):
        """read_only: for readers beside a live run (export): creates, deletes and cleans nothing."""
        policy = None
        if keep_steps:
            policy = checkpoint_managers.AnyPreservationPolicy([checkpoint_managers.LatestN(keep),
                                                                checkpoint_managers.CustomSteps(list(keep_steps))])
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(1, every_steps), max_to_keep=None if policy else keep, create=not read_only,
            read_only=read_only, cleanup_tmp_directories=not read_only, enable_async_checkpointing=async_save,
            preservation_policy=policy)
        self.directory = epath.Path(directory)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: Any, *, force: bool = False) -> bool:
        """state: pytree of global jax.Arrays. Returns whether a save was started."""
        args = ocp.args.Composite(state=ocp.args.PyTreeSave(state), data=ProcessStateSave(data_state))
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, target: Any, *, data: bool = True, partial: bool = False) -> tuple[Any, Any]:
        """target: pytree of jax.ShapeDtypeStruct with shardings -> (state, data-iterator state or None).

        partial: `target` is a subtree (e.g. {'ema_params': ...}); only that is read.
        """
        items = {"state": ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=partial)}
        if data:
            items["data"] = ProcessStateRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"], (restored["data"] if data else None)

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
