"""The one dtype vocabulary: names in both spellings ('fp32'/'float32', 'bf16'/'bfloat16',
'fp16'/'float16') or dtypes, resolved for JAX compute or numpy storage."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from ip2p_jax.errors import Ip2pError

NAMES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
         "fp16": "float16", "float16": "float16"}
_NUMPY = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}


class DtypeError(Ip2pError):
    """A dtype name or dtype this project does not compute in."""


def numpy_dtype(dtype) -> np.dtype:
    """A name in either spelling, or any numpy / jax float dtype -> float32, bfloat16 or float16."""
    if isinstance(dtype, str):
        if dtype not in NAMES:
            raise DtypeError(f"dtype must be one of {sorted(NAMES)}, got {dtype!r}")
        return _NUMPY[NAMES[dtype]]
    d = np.dtype(dtype)
    if d not in _NUMPY.values():
        raise DtypeError(f"dtype must be float32, bfloat16 or float16, got {d}")
    return d


def compute_dtype(dtype=None) -> jnp.dtype:
    """None -> bfloat16 on GPU/TPU and float32 on CPU; otherwise as numpy_dtype."""
    if dtype is None:
        return jnp.dtype(jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32)
    return jnp.dtype(numpy_dtype(dtype))


def short_name(dtype) -> str:
    """'fp32' | 'bf16' | 'fp16' for any accepted spelling or dtype."""
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[numpy_dtype(dtype).name]
