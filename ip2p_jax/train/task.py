"""What a run of the one training loop (train/loop.py) trains: a `Task`.

    train.editor.editor_task(config)              InstructPix2Pix (UNet, optionally the text encoder)
    train.autoencoder.autoencoder_task(config)    the KL autoencoder

The loop owns everything else: state init / orbax restore, the pmap or jit-mesh runner of the
one update step, metrics and the progress line, checkpoint cadence, SIGTERM save and resume.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import numpy as np

from ip2p_jax.train.step import StepConfig


@dataclasses.dataclass
class Task:
    abstract_params: Any                       # ShapeDtypeStructs of the trainable params (the restore target)
    init_params: Callable[[], Any]             # host fp32 params of a fresh start (not called on resume)
    frozen: dict                               # host arrays the step reads and does not train
    step_config: StepConfig                    # grad_accum, ema_decay (+ the InstructPix2Pix loss settings)
    models: Any = None                         # step.Models of the InstructPix2Pix loss ...
    loss_fn: Optional[Callable] = None         # ... or another loss(params, frozen, batch, step_key) -> (loss, aux)
    make_data: Optional[Callable[[], Any]] = None   # None: make_train_data(config, tokenizer)
    tokenizer: Any = None
    export: Optional[Callable[[Any, str], str]] = None   # (host TrainState, out_dir) -> what was written
    make_sampler: Optional[Callable[[Any], Callable]] = None   # (writer) -> sampler(step, ema_params)
    notes: list = dataclasses.field(default_factory=list)


def abstract_like(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.float32), tree)


