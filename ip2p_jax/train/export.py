"""`export_run(workdir, out)`: a run's EMA weights + its frozen parts as a complete diffusers folder
(loadable by EditPipeline and by diffusers' StableDiffusionInstructPix2PixPipeline)."""
from __future__ import annotations

import json
import os
from typing import Optional

import jax
import numpy as np

from ip2p_jax.errors import Ip2pError


class ExportError(Ip2pError):
    """A folder that is not a training run this project can export."""


def read_run_config(workdir: str):
    import ml_collections

    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise ExportError(f"{path}: not a training workdir (no config.json)")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def export_run(workdir: str, out: str, *, step: Optional[int] = None) -> str:
    from ip2p_jax.train.build import build
    from ip2p_jax.train.checkpoint import Checkpointer
    from ip2p_jax.train.loop import export

    workdir = os.path.abspath(workdir)
    config = read_run_config(workdir)
    built = build(config)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False, read_only=True)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None or step not in ckpt.all_steps():
            raise FileNotFoundError(f"{workdir}/checkpoints: no checkpoint"
                                    + (f" at step {step} (have {ckpt.all_steps()})" if step is not None else ""))
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = {"ema_params": jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), np.float32, sharding=device), built.params)}
        restored, _ = ckpt.restore(step, target, data=False, partial=True)
    finally:
        ckpt.close()
    return export(built, jax.device_get(restored["ema_params"]), out)
