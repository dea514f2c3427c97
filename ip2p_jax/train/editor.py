"""The InstructPix2Pix task of the training loop: models and params from config.model (train/build.py),
data from config.data, sample edits to TensorBoard, the EMA weights exported as a diffusers folder."""
from __future__ import annotations

import logging
from typing import Any, Optional

import jax
import numpy as np

from ip2p_jax import sharding
from ip2p_jax.pipeline import EditPipeline
from ip2p_jax.train.build import Built, build, export_components
from ip2p_jax.train.data import make_train_data
from ip2p_jax.train.parallel import fetch
from ip2p_jax.train.task import Task, abstract_like
from ip2p_jax.weights import save_diffusers_folder

log = logging.getLogger(__name__)


def export_editor(built: Built, ema_params: Any, out_dir: str, text_params: Any = None, *, overwrite: bool = True,
                  protect: tuple = ()) -> str:
    """Write the EMA weights (+ frozen parts) as a complete diffusers folder (process 0). The target
    must be new, empty or an earlier export (`overwrite`), outside `protect`; NaN weights are refused."""
    if jax.process_index() == 0:
        save_diffusers_folder(export_components(built, ema_params, text_params), out_dir, overwrite=overwrite,
                              protect=protect)
        log.info("exported the EMA weights to %s", out_dir)
    return out_dir


def editor_task(config, built: Optional[Built] = None) -> Task:
    built = built or build(config)
    sampler = None
    if config.log.sample_every_steps and config.data.source != "latent_cache":
        sampler = lambda writer: Sampler(config, built, writer)  # noqa: E731
    make_data = None
    if built.is_sdxl:   # both tokenizers' ids
        make_data = lambda: make_train_data(config, built.tokenizer, tokenizer_2=built.tokenizer_2)  # noqa: E731
    return Task(abstract_params=abstract_like(built.params), init_params=lambda: built.params, frozen=built.frozen,
                step_config=built.step_config, models=built.models, tokenizer=built.tokenizer, make_data=make_data,
                export=lambda state, out: export_editor(built, fetch(state.ema_params), out),
                make_sampler=sampler, notes=list(built.notes))


class Sampler:
    """Sample edits of a fixed validation set with the EMA weights, to TensorBoard (EditPipeline)."""

    def __init__(self, config, built: Built, writer):
        self.config, self.built, self.writer = config, built, writer
        self.pipe = None
        n = config.log.num_samples
        val = _validation_batch(config, built.tokenizer, n)
        self.images, self.targets = list(_uint8(val["input_image"])), list(_uint8(val["edited_image"]))
        self.instructions = [built.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in val["input_ids"]]

    def __call__(self, step: int, ema_params: dict) -> None:
        ema = fetch(ema_params)
        if self.pipe is None:
            self.pipe = EditPipeline(export_components(self.built, ema), dtype=self.built.step_config.compute_dtype)
        else:
            cast = lambda t: jax.tree.map(lambda a: np.asarray(a).astype(self.pipe.dtype), t)  # noqa: E731
            self.pipe.params = dict(self.pipe.params, unet=sharding.replicate(cast(ema["unet"]), self.pipe.mesh))
            if "text_encoder" in ema:
                self.pipe.params["text"] = sharding.replicate(cast(ema["text_encoder"]), self.pipe.mesh)
        g = self.config.log
        result = self.pipe.edit(self.images, self.instructions, steps=g.sample_steps, text_scale=g.text_guidance,
                                image_scale=g.image_guidance, seed=0, resize="keep", progress=False)
        if self.writer is not None:
            for i, (a, b, out) in enumerate(zip(self.images, self.targets, result.images)):
                out = np.asarray(out.resize((a.shape[1], a.shape[0])))
                self.writer.add_image(f"samples/{i}", np.concatenate([a, b, out], axis=1), step, dataformats="HWC")
                self.writer.add_text(f"samples/{i}/instruction", self.instructions[i], step)
            self.writer.flush()


def _uint8(images: np.ndarray) -> np.ndarray:
    if images.dtype == np.uint8:
        return images
    return np.clip((images.astype(np.float32) + 1) * 127.5, 0, 255).round().astype(np.uint8)


def _validation_batch(config, tokenizer, n: int) -> dict:
    """The first n examples of the validation stream (the same on every host)."""
    config = config.copy_and_resolve_references()
    config.train.batch_size = n
    data = make_train_data(config, tokenizer, split=config.data.validation_split, validation=True,
                           process=(0, 1))
    try:
        batch = next(data)
    finally:
        getattr(data, "close", lambda: None)()
    return {k: np.asarray(v)[:n] for k, v in batch.items()}
