"""Host-local batches -> global jax.Arrays sharded over the mesh's batch axes."""
from __future__ import annotations

from typing import Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec


def batch_sharding(mesh, batch_axes=("data",)):
    """NamedSharding putting the leading (batch) dimension over `batch_axes`, the rest replicated."""
    missing = [a for a in batch_axes if a not in mesh.axis_names]
    if missing:
        raise ValueError(f"mesh axes {mesh.axis_names} lack the batch axes {missing}")
    return NamedSharding(mesh, PartitionSpec(tuple(batch_axes)))


def to_global(local_batch: Mapping[str, np.ndarray], mesh, batch_axes=("data",)) -> dict:
    """Each host passes its own rows; returns {key: jax.Array of global shape (B_global, ...)}.

    The global batch is the hosts' local batches in process order; every host must pass the
    same keys, shapes and dtypes, and the local batch must divide over the host's devices.
    """
    sharding = batch_sharding(mesh, batch_axes)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def global_batches(pipeline, mesh, batch_axes=("data",)):
    """Generator of global batches from an EditPairPipeline (state stays on `pipeline`)."""
    for local in pipeline:
        yield to_global(local, mesh, batch_axes)
