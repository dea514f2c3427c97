"""Device meshes, batch padding and host <-> global arrays.

Inference and data-parallel training use a 1-D ('data',) mesh of all devices: the batch
axis is sharded over it, parameters are replicated. Batches are padded (to a power of two, to a
multiple of the device count) and unpadded after.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA = "data"
DEFAULT_CACHE_ENV = "IP2P_COMPILE_CACHE"   # the CLI default: a directory, or 0 for off
CACHE_ENV = "IP2P_JAX_COMPILATION_CACHE"


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data',) mesh over `devices` (default: every device of every process)."""
    if devices is None:
        return jax.make_mesh((jax.device_count(),), (DATA,), axis_types=(AxisType.Auto,))
    return Mesh(np.asarray(devices), (DATA,), axis_types=(AxisType.Auto,))


def traced_on(mesh: Mesh, fn: Callable) -> Callable:
    """`fn` traced with `mesh` as the context mesh (jax.sharding.get_abstract_mesh()): what the Pallas
    attention needs to run per shard of the batch instead of on the whole, replicated batch (an XLA
    custom call cannot be partitioned). jit's in/out shardings are unchanged."""
    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)
    return traced


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over 'data'; other axes whole."""
    return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_size(mesh: Mesh) -> int:
    return mesh.shape[DATA]


def local_size(mesh: Mesh) -> int:
    """Devices of the mesh that belong to this process."""
    return sum(d.process_index == jax.process_index() for d in mesh.devices.flat)


def padded_size(n: int, multiple: int) -> int:
    """Smallest multiple of `multiple` that is >= n (and >= multiple)."""
    return max(1, -(-n // multiple)) * multiple


def bucket_size(n: int, *, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum): padding batches to it lets a few compiled
    shapes serve every batch size."""
    return 1 << max(0, max(n, minimum) - 1).bit_length()


def pad_rows(x: np.ndarray, size: int) -> np.ndarray:
    """Pad the leading axis to `size` by repeating the last row (keeps values finite and
    typical, e.g. valid keys / images); the padded rows are dropped after the call."""
    n = x.shape[0]
    if n == size:
        return x
    if n == 0 or n > size:
        raise ValueError(f"cannot pad {n} rows to {size}")
    return np.concatenate([x, np.repeat(x[-1:], size - n, axis=0)], axis=0)


def to_global(x: Any, sharding: NamedSharding) -> jax.Array:
    """A host array that every process holds in full -> a global jax.Array with `sharding`."""
    x = np.asarray(x)
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def local_to_global(local: Any, mesh: Mesh) -> jax.Array:
    """This process's slice of a batch (rows of the global batch, in process order) -> the
    global batch-sharded array."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh), np.asarray(local))


def to_local(x: jax.Array, mesh: Mesh) -> np.ndarray:
    """A batch-sharded global array -> this process's rows (the inverse of local_to_global)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, P(DATA)))


def to_host(x: jax.Array) -> np.ndarray:
    """A global array -> the full numpy array on every process."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Put a pytree of arrays on every device of `mesh` (parameters)."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda a: to_global(a, sharding) if not isinstance(a, jax.Array)
                        else jax.device_put(a, sharding), tree)


def enable_compilation_cache(directory: str | None = None) -> str:
    """Switch on JAX's persistent compilation cache (compiled edits then survive restarts).

    `directory` defaults to $IP2P_JAX_COMPILATION_CACHE or ~/.cache/ip2p_jax/xla. Returns it.
    """
    directory = directory or os.environ.get(CACHE_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "ip2p_jax", "xla")
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


def default_compilation_cache() -> str | None:
    """The CLI's default: the persistent cache on, in $IP2P_COMPILE_CACHE if set (a directory), else
    enable_compilation_cache's default; off (None) when IP2P_COMPILE_CACHE is 0, off or false."""
    setting = os.environ.get(DEFAULT_CACHE_ENV, "").strip()
    if setting.lower() in ("0", "off", "false", "no"):
        return None
    return enable_compilation_cache(setting or None)
