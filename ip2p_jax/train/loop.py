"""The one training loop: resume or start, step, log, sample, checkpoint, stop cleanly, export.

    result = train(config, workdir)          # config.task: "editor" (default) or "autoencoder"
    result = train(config, workdir, task)    # a Task built by the caller (the demo model's stages)

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
from jax.experimental import multihost_utils

from ip2p_jax.errors import Ip2pError
from ip2p_jax.progress import progress
from ip2p_jax.train.autoencoder import autoencoder_task
from ip2p_jax.train.checkpoint import Checkpointer
from ip2p_jax.train.data import make_train_data, model_inputs
from ip2p_jax.train.editor import editor_task
from ip2p_jax.train.lora import lora_enabled, lora_task
from ip2p_jax.train.parallel import fetch, make_runner
from ip2p_jax.train.state import OptimizerConfig, abstract_train_state, learning_rate_schedule, make_optimizer
from ip2p_jax.train.task import Task
from ip2p_jax.train.workdir import (WorkdirLock, config_differences, config_json, make_workdir, read_config,
                                   write_config)
from ip2p_jax.weights.output_folder import check_output_folder

log = logging.getLogger("ip2p_jax.train")
TASKS = {"editor": editor_task, "autoencoder": autoencoder_task}
STANDARD_METRICS = ("loss", "grad_norm", "param_norm", "learning_rate", "finite", "nonfinite_run", "nonfinite_total")


class TrainingStopped(Ip2pError):
    """The run cannot go on (non-finite losses, bad settings); the message says why and what is kept."""


@dataclasses.dataclass
class RunResult:
    step: int                      # steps done (the train state's step)
    preempted: bool                # stopped by SIGTERM / preemption, checkpoint written
    export_dir: Optional[str]      # what the task's export wrote at the end, if anything
    metrics: dict                  # the last step's scalars
    state: Any = None              # the final train state on the host (train(..., return_state=True))


def show_progress_logs() -> None:
    """For entry points run without a logging set-up for INFO (the root logger at its WARNING default, nothing
    set on `ip2p_jax`): the package's INFO records (the progress lines) to stderr, as bare messages."""
    pkg = logging.getLogger("ip2p_jax")
    if pkg.handlers or pkg.level != logging.NOTSET or logging.getLogger().level <= logging.INFO:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    pkg.addHandler(handler)
    pkg.setLevel(logging.INFO)
    pkg.propagate = False


def _say(msg: str) -> None:
    if jax.process_index() == 0:
        log.info(msg)


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# (section.key, least value, only when) of the counts a run reads; checked before anything is built
COUNTS = (("train.batch_size", 1, None), ("train.grad_accum", 1, None), ("train.num_steps", 0, None),
          ("train.max_nonfinite_steps", 0, None), ("checkpoint.every_steps", 0, None), ("checkpoint.keep", 1, None),
          ("log.every_steps", 0, None), ("log.sample_every_steps", 0, None),
          ("log.num_samples", 1, "log.sample_every_steps"), ("log.sample_steps", 1, "log.sample_every_steps"),
          ("data.num_examples", 0, None), ("data.workers", -1, None), ("data.resolution", 1, None),
          ("parallel.fsdp", 1, None))


def _get(config, key: str):
    node = config
    for part in key.split("."):
        if not hasattr(node, "get") or part not in node:
            return None
        node = node[part]
    return node


def check_counts(config) -> None:
    """Counts and sizes out of range -> TrainingStopped naming the --config key."""
    for key, least, when in COUNTS:
        value = _get(config, key)
        if value is None or (when and not _get(config, when)):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise TrainingStopped(f"--config.{key}={value!r}: must be an integer >= {least}")


def check_batch(config, num_devices: int) -> None:
    b, k = config.train.batch_size, config.train.grad_accum
    if b % (k * num_devices):
        raise TrainingStopped(f"--config.train.batch_size={b}: must be a multiple of grad_accum ({k}) x devices "
                              f"({num_devices}) = {k * num_devices}")
    if b % jax.process_count():
        raise TrainingStopped(f"--config.train.batch_size={b}: does not split over {jax.process_count()} processes")


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
            try:
                return bool(multihost_utils.reached_preemption_sync_point(step))
            except RuntimeError:
                return False
        return self.requested


class MetricLog:
    """Per-step scalars (fetched one step late, so the host never waits on the current step);
    averages to TensorBoard and a progress line every `every` steps; the non-finite guard."""

    def __init__(self, writer, every: int, total_steps: int, batch_size: int, max_nonfinite: int, start: int,
                 jsonl_path: Optional[str] = None, bar=None):
        self.writer, self.every, self.total, self.batch = writer, max(1, every), total_steps, batch_size
        self.bar = bar
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
            log.warning("step %d: non-finite loss (%s), gradient norm (%s) or update; update skipped (%d in a "
                        "row, %d in all)", step, scalars["loss"], scalars["grad_norm"], scalars["nonfinite_run"],
                        scalars["nonfinite_total"])
        if self.max_nonfinite and scalars["nonfinite_run"] >= self.max_nonfinite:
            raise TrainingStopped(f"{scalars['nonfinite_run']} steps in a row (up to step {step}) had a non-finite "
                                  f"loss, gradient or update; stopping. Params, optimizer and EMA keep their last "
                                  f"finite update; lower optim.learning_rate or check the data, then resume.")
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
        extra = [k for k in self.last if k not in STANDARD_METRICS]   # the task's own (autoencoder: l1, psnr, ...)
        avg = {k: float(np.mean([w[k] for w in finite])) for k in ("loss", "grad_norm", *extra)}
        scalars = {"train/loss": avg["loss"], "train/grad_norm": avg["grad_norm"],
                   "train/param_norm": self.last["param_norm"], "train/learning_rate": self.last["learning_rate"],
                   "train/examples_per_s": rate, "train/nonfinite_total": self.last["nonfinite_total"],
                   **{f"train/{k}": avg[k] for k in extra}}
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
        extra_s = "".join(f"  {k} {avg[k]:.4g}" for k in extra)
        line = (f"step {step}/{self.total}  loss {avg['loss']:.4f}  grad {avg['grad_norm']:.3f}{extra_s}  "
                f"lr {self.last['learning_rate']:.2e}  {rate_s} ex/s  ETA {eta_s}")
        if self.bar is not None and jax.process_index() == 0:
            self.bar.write(line)
        else:
            _say(line)
        self.window, self.t_last, self.last_logged = [], now, step


def _restore_error(workdir: str, step: int, saved: Optional[dict], config, e: Exception) -> TrainingStopped:
    """A failed restore, told as the settings that differ from the checkpoint's run (not orbax's message)."""
    diffs = config_differences(saved, config_json(config)) if saved is not None else []
    model = [d for d in diffs if d.startswith(("model.", "task"))]
    if model:
        return TrainingStopped(f"{workdir}: cannot resume from checkpoint step {step}: it was written with other "
                               f"model settings ({'; '.join(model[:8])}); go on with the run's own settings "
                               f"({workdir}/config.json) or use a new --workdir")
    first = (str(e).strip().splitlines() or [""])[0][:300]
    changed = f"; settings changed since: {'; '.join(diffs[:8])}" if diffs else ""
    return TrainingStopped(f"{workdir}: cannot resume from checkpoint step {step} ({type(e).__name__}: "
                           f"{first}){changed}")


def _export_dir(config, workdir: str) -> str:
    return config.export.dir or os.path.join(workdir, "export")


def task_for(config) -> Task:
    name = config.get("task", "editor")
    if name not in TASKS:
        raise TrainingStopped(f"config.task must be one of {sorted(TASKS)}, got {name!r}")
    if name == "editor" and lora_enabled(config):   # config.lora.rank > 0: train adapters only
        return lora_task(config)
    return TASKS[name](config)


def train(config, workdir: str, task: Optional[Task] = None, *, return_state: bool = False) -> RunResult:
    """Checks the settings, the workdir (process 0 locks it) and the export folder before building anything;
    writes config.json once the checkpoint (if any) has been restored."""
    check_counts(config)
    workdir = make_workdir(workdir)
    with WorkdirLock(workdir):
        return _train(config, workdir, task, return_state)


def _train(config, workdir: str, task: Optional[Task], return_state: bool) -> RunResult:
    exporting = config.export.at_end and config.get("task", "editor") == "editor"
    if exporting and jax.process_index() == 0:   # a folder of the user's files is refused now, not at the end
        check_output_folder(_export_dir(config, workdir), overwrite=True, protect=[workdir])
    task = task or task_for(config)
    for note in task.notes:
        _say(note)
    opt_cfg = OptimizerConfig.from_mapping(config.optim)
    tx, lr_schedule = make_optimizer(opt_cfg), learning_rate_schedule(opt_cfg)
    p = config.parallel
    runner = make_runner(p.mode, task.models, task.step_config, tx, lr_schedule, mesh_data=p.mesh_data,
                         fsdp=p.fsdp, fsdp_min_size=p.fsdp_min_size, loss_fn=task.loss_fn)
    check_batch(config, runner.num_devices)

    k = config.checkpoint
    keep_steps = tuple(k.get("keep_steps", ()))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), k.every_steps, k.keep, k.async_save,
                        keep_steps=keep_steps)
    data = task.make_data() if task.make_data else make_train_data(config, task.tokenizer)
    start = ckpt.latest_step()
    if start is not None:
        try:
            restored, data_state = ckpt.restore(start, runner.restore_target(
                abstract_train_state(task.abstract_params, tx)))
        except Ip2pError:
            ckpt.close()
            raise
        except Exception as e:   # orbax's shape / structure mismatch: say which settings changed
            ckpt.close()
            raise _restore_error(workdir, start, read_config(workdir), config, e) from e
        state = runner.from_global(restored)
        data.set_state(data_state)
        _say(f"resumed from {ckpt.directory}/{start}")
    else:
        state, start = runner.init_state(task.init_params(), config.seed), 0
    write_config(config, workdir)   # only now: a failed resume leaves the run's config.json as it was
    frozen = runner.put_frozen(task.frozen)

    writer = None
    if jax.process_index() == 0 and config.log.tensorboard:
        from tensorboardX import SummaryWriter  # optional heavy dependency
        writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
    t = config.train
    bar = progress(total=t.num_steps, initial=start, desc="train", unit="step",
                   enabled=bool(config.log.get("progress_bar", False)) and jax.process_index() == 0)
    metrics_log = MetricLog(writer, config.log.every_steps, t.num_steps, t.batch_size, t.max_nonfinite_steps, start,
                            os.path.join(workdir, "metrics.jsonl"), bar=bar)
    sampler = None
    sample_every = config.log.sample_every_steps
    if sample_every and start < t.num_steps and sample_every <= t.num_steps and task.make_sampler is not None:
        try:   # reads the validation split now: a missing one is an error before step 1, not at the first sample
            sampler = task.make_sampler(writer)
        except BaseException:
            bar.close()
            ckpt.close()
            getattr(data, "close", lambda: None)()
            raise
    step, pending, preempted = start, None, False
    _say(f"training steps {start}..{t.num_steps} on {runner.num_devices} devices ({runner.mode}), "
         f"global batch {t.batch_size} = {t.grad_accum} x {t.batch_size // t.grad_accum}")
    try:
        with StopFlag() as stop:
            while step < t.num_steps:
                batch = runner.put_batch(model_inputs(next(data)))
                state, metrics = runner.step(state, frozen, batch)
                step += 1
                bar.update(1)
                data_state = data.get_state()
                if pending is not None:
                    metrics_log.add(pending[0], runner.scalars(pending[1]))
                pending = (step, metrics)
                preempted = stop.should_stop(step)
                if preempted or step == t.num_steps or step % max(1, k.every_steps) == 0 or step in keep_steps:
                    ckpt.save(step, runner.to_global(state), data_state, force=True)
                if sample_every and step % sample_every == 0:
                    if task.make_sampler is None:
                        _say("log.sample_every_steps: this run has no sample edits (a latent_cache run has no "
                             "images; the autoencoder samples none)")
                        sample_every = 0
                    else:
                        sampler = sampler or task.make_sampler(writer)
                        sampler(step, runner.to_global(state).ema_params)
                if preempted:
                    _say(f"stop requested: checkpoint written at step {step}")
                    break
            if pending is not None:
                metrics_log.add(pending[0], runner.scalars(pending[1]))
    finally:
        bar.close()
        ckpt.close()
        if writer is not None:
            writer.close()
        getattr(data, "close", lambda: None)()

    export_dir = None
    if not preempted and step >= t.num_steps and config.export.at_end and task.export:
        export_dir = task.export(runner.to_global(state), _export_dir(config, workdir))
    return RunResult(step=step, preempted=preempted, export_dir=export_dir, metrics=metrics_log.last,
                     state=fetch(runner.to_global(state)) if return_state else None)
