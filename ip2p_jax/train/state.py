"""Train state (trainable params fp32, AdamW state, EMA, counters, RNG), the optimizer and the EMA rule.

Imports only jax/flax/optax (and the project's error base) so scripts/benchmark_train.py can use it on machines without
ml_collections, grain or diffusers.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ip2p_jax.errors import Ip2pError


FLAT_MULTIPLE = 4096  # the flat optimizer vector is padded to this, so it divides over any fsdp size <= 4096


@flax.struct.dataclass
class TrainState:
    step: jax.Array             # int32: batches consumed (advances on skipped steps too)
    updates: jax.Array          # int32: optimizer updates applied (EMA warm-up and LR schedule count)
    params: Any                 # trainable params, fp32: {'unet': ...} (+ 'text_encoder' when trained)
    opt_state: Any              # AdamW state of ravel(params): flat fp32 vectors (see `ravel`)
    ema_params: Any             # EMA of `params`, fp32
    rng: jax.Array              # uint32[2] root key data (jax.random.wrap_key_data: the typed key)
    nonfinite_run: jax.Array    # int32: consecutive steps skipped (non-finite loss, gradient or update)
    nonfinite_total: jax.Array  # int32: all skipped steps


class OptimizerConfigError(Ip2pError):
    """Optimizer / learning-rate settings that do not fit together."""


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 1e-4
    warmup_steps: int = 0          # linear warm-up from 0 to learning_rate, then constant
    decay_start: int = 0           # with decay_steps > 0: from this step, linear cool-down to 0
    decay_steps: int = 0           # over this many steps (warmup-stable-decay); 0 = no cool-down
    weight_decay: float = 1e-2     # torch.optim.AdamW's default, as the authors' optimizer
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0     # global-norm clipping; 0 turns it off

    @classmethod
    def from_mapping(cls, m) -> "OptimizerConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: m[k] for k in names if k in m})


def learning_rate_schedule(cfg: OptimizerConfig) -> Callable[[jax.Array], jax.Array]:
    """Warm-up, constant, then (optionally) a linear cool-down to 0. The cool-down can be
    decided late: a run resumed from a constant-rate checkpoint with decay_start at or after
    its step continues exactly as before until decay_start."""
    if cfg.decay_steps < 0 or (cfg.decay_steps > 0 and cfg.decay_start < cfg.warmup_steps):
        raise OptimizerConfigError(f"decay_steps must be >= 0 and decay_start >= warmup_steps, got decay_start="
                         f"{cfg.decay_start}, decay_steps={cfg.decay_steps}, warmup_steps={cfg.warmup_steps}")
    if cfg.warmup_steps > 0:
        sched = optax.warmup_constant_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
    else:
        sched = optax.constant_schedule(cfg.learning_rate)
    if cfg.decay_steps > 0:
        cool = optax.linear_schedule(cfg.learning_rate, 0.0, cfg.decay_steps)
        sched = optax.join_schedules([sched, cool], [cfg.decay_start])
    return sched


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """Global-norm clipping (optional) then AdamW with decoupled weight decay on every parameter."""
    parts = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm > 0 else []
    parts.append(optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay))
    return optax.chain(*parts)


def ravel(tree: Any) -> jax.Array:
    """All leaves as one fp32 vector (tree order), zero-padded to a multiple of FLAT_MULTIPLE.

    The optimizer runs on this vector: a few large elementwise kernels instead of several per
    leaf (an SD UNet has ~700 leaves), which compiles and runs faster; padding keeps it
    divisible over an fsdp mesh axis. Params and EMA stay named trees.
    """
    flat = jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in jax.tree.leaves(tree)])
    return jnp.pad(flat, (0, -flat.shape[0] % FLAT_MULTIPLE))


def ravel_size(tree: Any) -> int:
    """Length of `ravel(tree)` (padded)."""
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    return n + (-n % FLAT_MULTIPLE)


def unravel_like(flat: jax.Array, like: Any) -> Any:
    """Inverse of `ravel`: slice `flat` back into a tree shaped (and typed) like `like`."""
    leaves, treedef = jax.tree.flatten(like)
    out, start = [], 0
    for x in leaves:
        n = int(np.prod(x.shape))
        out.append(flat[start:start + n].reshape(x.shape).astype(x.dtype))
        start += n
    return jax.tree.unflatten(treedef, out)


def ema_decay(num_updates: jax.Array, decay: float) -> jax.Array:
    """The authors' (LitEma) warm-up: min(decay, (1+n)/(10+n)), n = updates applied so far, this one included."""
    n = jnp.asarray(num_updates, jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + n) / (10.0 + n))


def ema_update(ema: Any, params: Any, num_updates: jax.Array, decay: float) -> Any:
    """ema <- ema - (1 - d) * (ema - params), d = ema_decay(num_updates, decay)."""
    one_minus = 1.0 - ema_decay(num_updates, decay)
    return jax.tree.map(lambda e, p: e - one_minus * (e - p.astype(e.dtype)), ema, params)


def create_train_state(params: Any, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """A fresh state; the EMA starts as a copy of the params (distinct buffers, so the state can be donated)."""
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731  (one buffer per counter: donation needs distinct buffers)
    return TrainState(
        step=zero(), updates=zero(), params=params, opt_state=tx.init(ravel(params)),
        ema_params=jax.tree.map(jnp.copy, params), rng=jax.random.key_data(jax.random.key(seed)),
        nonfinite_run=zero(), nonfinite_total=zero())


def abstract_train_state(abstract_params: Any, tx: optax.GradientTransformation) -> TrainState:
    """The state's shapes and dtypes without allocating it (for sharded init and checkpoint restore)."""
    return jax.eval_shape(lambda p: create_train_state(p, tx, 0), abstract_params)
