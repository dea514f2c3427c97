"""Two ways to run the one train step on many devices and hosts.

PmapRunner   jax.pmap over each host's local devices, axis 'batch', gradients lax.pmean'ed
             (pure data parallel; the state is replicated, stacked on a leading device axis).
MeshRunner   jax.jit with in/out shardings on a ('data', 'fsdp') mesh over all devices: the
             batch is split over both axes; params, optimizer state, EMA (and the frozen
             VAE/text encoder) are sharded over 'fsdp' along their largest divisible axis and
             replicated over 'data'. fsdp=1 is data parallel under GSPMD.

Both run `step.make_train_step` (the InstructPix2Pix loss) or, given `loss_fn`, the same update
step over another loss (the autoencoder). Both take host-local numpy batches (each host its own slice of the global batch), add the
global `example_id`s the step keys its randomness on, and convert the state to / from global
arrays for orbax (`to_global`, `restore_target`, `from_global`).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from ip2p_jax import sharding
from ip2p_jax.errors import Ip2pError
from ip2p_jax.train.state import TrainState, abstract_train_state, create_train_state, ravel_size
from ip2p_jax.train.step import make_train_step, make_update_step

MODES = ("pmap", "jit")


class ParallelConfigError(Ip2pError):
    """config.parallel does not fit the devices."""


def build_step(models, step_cfg, tx, lr_schedule, loss_fn=None, **kwargs) -> Callable:
    """The one train step: the InstructPix2Pix loss of `models`, or `loss_fn` when given."""
    if loss_fn is None:
        return make_train_step(models, step_cfg, tx, lr_schedule, **kwargs)
    return make_update_step(loss_fn, step_cfg, tx, lr_schedule, **kwargs)


def add_example_ids(local_batch: dict, local_size: int) -> dict:
    """Global example ids for this host's slice: process_index * local_size + arange(local_size)."""
    start = jax.process_index() * local_size
    return {**local_batch, "example_id": np.arange(start, start + local_size, dtype=np.int32)}


def local_batch_size(batch: dict) -> int:
    sizes = {k: np.shape(v)[0] for k, v in batch.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"batch arrays disagree on the batch size: {sizes}")
    return next(iter(sizes.values()))


def fetch(tree: Any) -> Any:
    """Device arrays (replicated, sharded, multi-host) -> host numpy, same values on every host."""
    def get(x):
        if not isinstance(x, jax.Array):
            return np.asarray(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        if x.is_fully_addressable:
            return np.asarray(x)
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return jax.tree.map(get, tree)


class PmapRunner:
    """Pure data parallel: pmap over local devices; the global batch is split over all devices."""

    mode = "pmap"

    def __init__(self, models, step_cfg, tx, lr_schedule, loss_fn=None):
        self.devices = jax.local_devices()
        self.n = len(self.devices)
        self.local_mesh = Mesh(np.asarray(self.devices), ("batch",))
        self.stacked = NamedSharding(self.local_mesh, P("batch"))
        self.tx = tx
        step = build_step(models, step_cfg, tx, lr_schedule, loss_fn, axis_name="batch")
        self._step = jax.pmap(step, axis_name="batch", donate_argnums=(0,))
        self._unstack = None

    @property
    def num_devices(self) -> int:
        return jax.device_count()

    def _replicate(self, tree):
        def rep(x):
            x = np.asarray(x) if not isinstance(x, jax.Array) else x
            shards = [jax.device_put(x[None], d) for d in self.devices]
            return jax.make_array_from_single_device_arrays((self.n,) + x.shape, self.stacked, shards)
        return jax.tree.map(rep, tree)

    def init_state(self, params: Any, seed: int) -> TrainState:
        # axis_name as in the step, so the state's sharding matches the step's output (no recompile)
        return jax.pmap(lambda p: create_train_state(p, self.tx, seed), axis_name="batch")(self._replicate(params))

    def put_frozen(self, frozen: dict) -> dict:
        return self._replicate(frozen)

    def put_batch(self, local_batch: dict) -> dict:
        b = local_batch_size(local_batch)
        if b % self.n:
            raise ValueError(f"host batch of {b} does not split over {self.n} local devices")
        batch = add_example_ids(local_batch, b)
        return jax.tree.map(lambda x: jax.device_put(
            np.asarray(x).reshape((self.n, b // self.n) + np.shape(x)[1:]), self.stacked), batch)

    def step(self, state, frozen, batch):
        return self._step(state, frozen, batch)

    def scalars(self, metrics: dict) -> dict:
        return {k: np.asarray(v.addressable_data(0)).reshape(-1)[0].item() for k, v in metrics.items()}

    # --- checkpoints: the replicated stack <-> one copy per host (a global array on each host's first device) ---
    @staticmethod
    def _host_sharding() -> NamedSharding:
        firsts = [min((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id)
                  for p in range(jax.process_count())]
        return NamedSharding(Mesh(np.asarray(firsts), ("hosts",)), P())

    def to_global(self, state):
        # Device 0's replica, without its leading axis, in one compiled call on that device (no copy on the
        # others); with several hosts, those copies form one array replicated over each host's first device.
        first = min(self.devices, key=lambda d: d.id)
        replica = jax.tree.map(lambda x: next(s.data for s in x.addressable_shards if s.device == first), state)
        if self._unstack is None:
            self._unstack = jax.jit(lambda t: jax.tree.map(lambda x: x[0], t))
        local = self._unstack(replica)
        if jax.process_count() == 1:
            return local
        sharding = self._host_sharding()
        return jax.tree.map(lambda x: jax.make_array_from_single_device_arrays(x.shape, sharding, [x]), local)

    def restore_target(self, abstract_state):
        sh = self._host_sharding()
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract_state)

    def from_global(self, state):
        def stack(x):
            one = x.addressable_shards[0].data
            shards = [jax.device_put(one[None], d) for d in self.devices]
            return jax.make_array_from_single_device_arrays((self.n,) + x.shape, self.stacked, shards)
        return jax.tree.map(stack, state)


def fsdp_spec(shape: tuple, fsdp: int, min_size: int) -> P:
    """Shard the largest axis divisible by `fsdp` over 'fsdp' (arrays of >= min_size elements)."""
    if fsdp <= 1 or math.prod(shape) < min_size:
        return P()
    axes = sorted((i for i, d in enumerate(shape) if d % fsdp == 0 and d >= fsdp), key=lambda i: -shape[i])
    if not axes:
        return P()
    spec = [None] * len(shape)
    spec[axes[0]] = "fsdp"
    return P(*spec)


def make_mesh(data: int = -1, fsdp: int = 1) -> Mesh:
    n = jax.device_count()
    if data == -1:
        if n % fsdp:
            raise ParallelConfigError(f"fsdp={fsdp} does not divide the {n} devices")
        data = n // fsdp
    if data * fsdp != n:
        raise ParallelConfigError(f"mesh data={data} x fsdp={fsdp} != {n} devices")
    return jax.make_mesh((data, fsdp), ("data", "fsdp"), axis_types=(AxisType.Auto, AxisType.Auto))


class MeshRunner:
    """jit with in/out shardings on a ('data', 'fsdp') mesh."""

    mode = "jit"

    def __init__(self, models, step_cfg, tx, lr_schedule, mesh: Mesh, fsdp_min_size: int = 2 ** 14, loss_fn=None):
        self.mesh = mesh
        self.fsdp = mesh.shape["fsdp"]
        self.min_size = fsdp_min_size
        self.tx = tx
        self.batch_sharding = NamedSharding(mesh, P(("data", "fsdp")))
        self.replicated = NamedSharding(mesh, P())
        self._models, self._step_cfg, self._lr, self._loss_fn = models, step_cfg, lr_schedule, loss_fn
        self._compiled = None
        self._state_sh = None

    @property
    def num_devices(self) -> int:
        return self.mesh.size

    def shardings(self, abstract_tree):
        return jax.tree.map(lambda a: NamedSharding(self.mesh, fsdp_spec(a.shape, self.fsdp, self.min_size)),
                            abstract_tree)

    def init_state(self, params: Any, seed: int) -> TrainState:
        abstract = abstract_train_state(jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.float32),
                                                     params), self.tx)
        self._state_sh, self._flat_size = self.shardings(abstract), ravel_size(abstract.params)
        params = jax.device_put(params, self._state_sh.params)
        return jax.jit(lambda p: create_train_state(p, self.tx, seed), out_shardings=self._state_sh)(params)

    def put_frozen(self, frozen: dict) -> dict:
        self._frozen_sh = self.shardings(jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), frozen))
        return jax.device_put(frozen, self._frozen_sh)

    def put_batch(self, local_batch: dict) -> dict:
        b = local_batch_size(local_batch)
        batch = add_example_ids(local_batch, b)
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(x)),
                            batch)

    def _compile(self):
        flat = NamedSharding(self.mesh, fsdp_spec((self._flat_size,), self.fsdp, self.min_size))
        step = build_step(self._models, self._step_cfg, self.tx, self._lr, self._loss_fn, flat_sharding=flat)
        # traced on the mesh: the Pallas attention then runs per batch shard (models.pallas_attention)
        return jax.jit(sharding.traced_on(self.mesh, step),
                       in_shardings=(self._state_sh, self._frozen_sh, self.batch_sharding),
                       out_shardings=(self._state_sh, self.replicated), donate_argnums=(0,))

    def step(self, state, frozen, batch):
        if self._compiled is None:
            self._compiled = self._compile()
        return self._compiled(state, frozen, batch)

    def scalars(self, metrics: dict) -> dict:
        return {k: np.asarray(v.addressable_data(0)).item() for k, v in metrics.items()}

    def to_global(self, state):
        return state

    def restore_target(self, abstract_state):
        sh = self.shardings(abstract_state)
        self._state_sh, self._flat_size = sh, ravel_size(abstract_state.params)
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, sh)

    def from_global(self, state):
        return state


def make_runner(mode: str, models, step_cfg, tx, lr_schedule, *, mesh_data: int = -1, fsdp: int = 1,
                fsdp_min_size: int = 2 ** 14, loss_fn=None):
    if mode == "pmap":
        if fsdp != 1:
            raise ParallelConfigError("fsdp > 1 needs parallel.mode='jit' (pmap replicates the state)")
        return PmapRunner(models, step_cfg, tx, lr_schedule, loss_fn)
    if mode == "jit":
        return MeshRunner(models, step_cfg, tx, lr_schedule, make_mesh(mesh_data, fsdp), fsdp_min_size, loss_fn)
    raise ParallelConfigError(f"parallel.mode must be one of {MODES}, got {mode!r}")
