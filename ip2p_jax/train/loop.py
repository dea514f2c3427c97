"""The training loop: resume or start, step, log, sample, checkpoint, stop cleanly, export.

    result = train(config, workdir)

Starting the same command again resumes from the latest complete checkpoint in
`<workdir>/checkpoints` (train state + every host's data-iterator position), so an
uninterrupted run and a killed-and-restarted one end with the same parameters. SIGTERM (or a
preemption notice on multi-host runs) saves a checkpoint at the next step and returns.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from typing import Any, Optional

import jax
import numpy as np

from ip2p_jax.errors import Ip2pError
from ip2p_jax.train.build import Built, build, export_components
from ip2p_jax.train.checkpoint import Checkpointer
from ip2p_jax.train.data import make_train_data, model_inputs
from ip2p_jax.train.parallel import fetch, make_runner
from ip2p_jax.train.state import OptimizerConfig, abstract_train_state, learning_rate_schedule, make_optimizer

log = logging.getLogger("ip2p_jax.train")


class TrainingStopped(Ip2pError):
    """The run cannot go on (non-finite losses, bad settings); the message says why and what is kept."""


@dataclasses.dataclass
class RunResult:
    step: int                      # steps done (the train state's step)
    preempted: bool                # stopped by SIGTERM / preemption, checkpoint written
    export_dir: Optional[str]      # the diffusers folder written at the end, if any
    metrics: dict                  # the last step's scalars


def _say(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)
    log.info(msg)


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def check_batch(config, num_devices: int) -> None:
    b, k = config.train.batch_size, config.train.grad_accum
    if b % (k * num_devices):
        raise TrainingStopped(f"train.batch_size={b} must be a multiple of grad_accum ({k}) x devices "
                              f"({num_devices}) = {k * num_devices}")
    if b % jax.process_count():
        raise TrainingStopped(f"train.batch_size={b} does not split over {jax.process_count()} processes")


class StopFlag:
    """SIGTERM -> stop at the next step (single process); multi-host runs use JAX's preemption sync."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if jax.process_count() == 1:
            try:
                self._previous = signal.signal(signal.SIGTERM, self._handle)
            except ValueError:  # not the main thread
                self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            try:
                return bool(multihost_utils.reached_preemption_sync_point(step))
            except RuntimeError:
                return False
        return self.requested


class MetricLog:
    """Per-step scalars (fetched one step late, so the host never waits on the current step);
    averages to TensorBoard and a progress line every `every` steps; the non-finite guard."""

    def __init__(self, writer, every: int, total_steps: int, batch_size: int, max_nonfinite: int, start: int,
                 jsonl_path: Optional[str] = None):
        self.writer, self.every, self.total, self.batch = writer, max(1, every), total_steps, batch_size
        self.jsonl_path = jsonl_path
        self.max_nonfinite, self.start = max_nonfinite, start
        self.window: list[dict] = []
        self.t_last: Optional[float] = None
        self.t_first: Optional[float] = None
        self.step_first = start
        self.last: dict = {}

    def add(self, step: int, scalars: dict) -> None:
        now = time.perf_counter()
        if self.t_first is None:      # the first step includes compilation: time from its end
            self.t_first, self.t_last, self.step_first = now, now, step
            self.last_logged = step
        self.last = scalars
        self.window.append(scalars)
        if not scalars["finite"]:
            log.warning("step %d: non-finite loss (%s) or gradient norm (%s); update skipped (%d in a row, "
                        "%d in all)", step, scalars["loss"], scalars["grad_norm"], scalars["nonfinite_run"],
                        scalars["nonfinite_total"])
            if jax.process_index() == 0:
                print(f"step {step}: non-finite loss/gradient, update skipped "
                      f"({scalars['nonfinite_run']} in a row)", flush=True)
        if self.max_nonfinite and scalars["nonfinite_run"] >= self.max_nonfinite:
            raise TrainingStopped(f"{scalars['nonfinite_run']} steps in a row (up to step {step}) had a non-finite "
                                  f"loss or gradient; stopping. Params, optimizer and EMA keep their last finite "
                                  f"update; lower optim.learning_rate or check the data, then resume.")
        if step % self.every == 0 or step == self.total:
            self.flush(step, now)

    def flush(self, step: int, now: float) -> None:
        if not self.window:
            return
        steps = step - self.last_logged
        dt = now - self.t_last
        rate = steps * self.batch / dt if dt > 0 and steps > 0 else float("nan")
        done_time = now - self.t_first
        per_step = done_time / (step - self.step_first) if step > self.step_first else float("nan")
        eta = per_step * (self.total - step) if np.isfinite(per_step) else float("nan")
        finite = [w for w in self.window if w["finite"]] or self.window
        avg = {k: float(np.mean([w[k] for w in finite])) for k in ("loss", "grad_norm")}
        scalars = {"train/loss": avg["loss"], "train/grad_norm": avg["grad_norm"],
                   "train/param_norm": self.last["param_norm"], "train/learning_rate": self.last["learning_rate"],
                   "train/examples_per_s": rate, "train/nonfinite_total": self.last["nonfinite_total"]}
        if self.writer is not None:
            for k, v in scalars.items():
                if np.isfinite(v):
                    self.writer.add_scalar(k, v, step)
            self.writer.flush()
        if self.jsonl_path and jax.process_index() == 0:
            with open(self.jsonl_path, "a") as f:
                f.write(json.dumps({"step": step, **{k.split("/")[1]: v for k, v in scalars.items()}}) + "\n")
        eta_s = _fmt_time(eta) if np.isfinite(eta) else "?"
        rate_s = f"{rate:.1f}" if np.isfinite(rate) else "?"
        _say(f"step {step}/{self.total}  loss {avg['loss']:.4f}  grad {avg['grad_norm']:.3f}  "
             f"lr {self.last['learning_rate']:.2e}  {rate_s} ex/s  ETA {eta_s}")
        self.window, self.t_last, self.last_logged = [], now, step


def _write_config(config, workdir: str) -> None:
    if jax.process_index() != 0:
        return
    path = os.path.join(workdir, "config.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(tmp, path)


def export(built: Built, ema_params: Any, out_dir: str, text_params: Any = None) -> str:
    """Write the EMA weights (+ frozen parts) as a complete diffusers folder (process 0)."""
    if jax.process_index() == 0:
        from ip2p_jax.weights import save_diffusers_folder

        save_diffusers_folder(export_components(built, ema_params, text_params), out_dir, overwrite=True)
        _say(f"exported the EMA weights to {out_dir}")
    return out_dir


class Sampler:
    """Sample edits of a fixed validation set with the EMA weights, to TensorBoard (EditPipeline)."""

    def __init__(self, config, built: Built, writer):
        self.config, self.built, self.writer = config, built, writer
        self.pipe = None
        n = config.log.num_samples
        val = _validation_batch(config, built.tokenizer, n)
        self.images = [np.clip((x + 1) * 127.5, 0, 255).round().astype(np.uint8) for x in val["input_image"]]
        self.targets = [np.clip((x + 1) * 127.5, 0, 255).round().astype(np.uint8) for x in val["edited_image"]]
        self.instructions = [built.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in val["input_ids"]]

    def __call__(self, step: int, ema_params: dict) -> None:
        from ip2p_jax.pipeline import EditPipeline
        from ip2p_jax import sharding

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


def train(config, workdir: str) -> RunResult:
    workdir = os.path.abspath(os.fspath(workdir))
    os.makedirs(workdir, exist_ok=True)
    _write_config(config, workdir)
    built = build(config)
    for note in built.notes:
        _say(note)
    opt_cfg = OptimizerConfig.from_mapping(config.optim)
    tx, lr_schedule = make_optimizer(opt_cfg), learning_rate_schedule(opt_cfg)
    p = config.parallel
    runner = make_runner(p.mode, built.models, built.step_config, tx, lr_schedule, mesh_data=p.mesh_data,
                         fsdp=p.fsdp, fsdp_min_size=p.fsdp_min_size)
    check_batch(config, runner.num_devices)

    k = config.checkpoint
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), k.every_steps, k.keep, k.async_save)
    data = make_train_data(config, built.tokenizer)
    start = ckpt.latest_step()
    if start is not None:
        abstract = abstract_train_state(jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.float32),
                                                     built.params), tx)
        restored, data_state = ckpt.restore(start, runner.restore_target(abstract))
        state = runner.from_global(restored)
        data.set_state(data_state)
        _say(f"resumed from {ckpt.directory}/{start}")
    else:
        state, start = runner.init_state(built.params, config.seed), 0
    frozen = runner.put_frozen(built.frozen)

    writer = None
    if jax.process_index() == 0 and config.log.tensorboard:
        from tensorboardX import SummaryWriter
        writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
    t = config.train
    metrics_log = MetricLog(writer, config.log.every_steps, t.num_steps, t.batch_size, t.max_nonfinite_steps, start,
                            os.path.join(workdir, "metrics.jsonl"))
    sampler = None
    sample_every = config.log.sample_every_steps
    step, pending, preempted = start, None, False
    _say(f"training steps {start}..{t.num_steps} on {runner.num_devices} devices ({runner.mode}), "
         f"global batch {t.batch_size} = {t.grad_accum} x {t.batch_size // t.grad_accum}")
    try:
        with StopFlag() as stop:
            while step < t.num_steps:
                batch = runner.put_batch(model_inputs(next(data)))
                state, metrics = runner.step(state, frozen, batch)
                step += 1
                data_state = data.get_state()
                if pending is not None:
                    metrics_log.add(pending[0], runner.scalars(pending[1]))
                pending = (step, metrics)
                preempted = stop.should_stop(step)
                if preempted or step == t.num_steps or step % max(1, k.every_steps) == 0:
                    ckpt.save(step, runner.to_global(state), data_state, force=True)
                if sample_every and step % sample_every == 0:
                    if config.data.source == "latent_cache":
                        _say("log.sample_every_steps: sample edits need images; a latent_cache run has none")
                        sample_every = 0
                    else:
                        sampler = sampler or Sampler(config, built, writer)
                        sampler(step, runner.to_global(state).ema_params)
                if preempted:
                    _say(f"stop requested: checkpoint written at step {step}")
                    break
            if pending is not None:
                metrics_log.add(pending[0], runner.scalars(pending[1]))
    finally:
        ckpt.close()
        if writer is not None:
            writer.close()
        getattr(data, "close", lambda: None)()

    export_dir = None
    if not preempted and step >= t.num_steps and config.export.at_end:
        final = runner.to_global(state)
        export_dir = export(built, fetch(final.ema_params), config.export.dir or os.path.join(workdir, "export"))
    return RunResult(step=step, preempted=preempted, export_dir=export_dir, metrics=metrics_log.last)
