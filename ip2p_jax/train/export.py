"""`export_run(workdir, out)`: a run's EMA weights + its frozen parts as a complete diffusers folder
(loadable by EditPipeline and by diffusers' StableDiffusionInstructPix2PixPipeline), or for a LoRA run
(config.lora.rank > 0) its EMA adapters as OUT/pytorch_lora_weights.safetensors; `read_ema`: the
EMA params of a run's checkpoint (also the demo model's assemble stage)."""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from ip2p_jax.errors import Ip2pError
from ip2p_jax.train.build import build
from ip2p_jax.train.checkpoint import Checkpointer
from ip2p_jax.train.editor import export_editor
from ip2p_jax.train.lora import export_lora, lora_enabled, lora_task
from ip2p_jax.weights.output_folder import check_output_folder


class ExportError(Ip2pError):
    """A workdir without the run config or checkpoint asked for."""


def read_run_config(workdir: str):
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise ExportError(f"{path}: not a training workdir (no config.json)")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def read_ema(workdir: str, abstract_params: Any, step: Optional[int] = None) -> tuple[Any, int]:
    """(EMA params as host numpy, step) from <workdir>/checkpoints (the latest step by default)."""
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False, read_only=True)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None or step not in ckpt.all_steps():
            raise ExportError(f"{workdir}/checkpoints: no checkpoint"
                              + (f" at step {step} (have {ckpt.all_steps()})" if step is not None else ""))
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = {"ema_params": jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), np.float32, sharding=device), abstract_params)}
        restored, _ = ckpt.restore(step, target, data=False, partial=True)
    finally:
        ckpt.close()
    return jax.device_get(restored["ema_params"]), step


def export_run(workdir: str, out: str, *, step: Optional[int] = None, overwrite: bool = False) -> str:
    """Refuses (before loading anything) a target that is not new, empty or an earlier export
    (`overwrite`), and non-finite weights (see weights/output_folder.py)."""
    workdir = os.path.abspath(workdir)
    check_output_folder(out, overwrite=overwrite, protect=[workdir])
    config = read_run_config(workdir)
    built = build(config)
    if lora_enabled(config):   # a LoRA run: its EMA adapters as pytorch_lora_weights.safetensors
        task = lora_task(config, built)
        ema, _ = read_ema(workdir, task.abstract_params, step)
        r = config.lora
        return export_lora(ema, out, rank=int(r.rank), alpha=float(r.alpha) or float(r.rank), overwrite=overwrite,
                           protect=[workdir])
    ema, _ = read_ema(workdir, built.params, step)
    return export_editor(built, ema, out, overwrite=overwrite, protect=[workdir])
