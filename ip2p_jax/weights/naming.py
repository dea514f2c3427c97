"""PyTorch state-dict names <-> Flax param paths: one table of renames plus kernel transposes.

Convention used by every module in ip2p_jax.models: a Flax param path is the PyTorch
module path, where a list element `blocks.3` becomes one path segment `blocks_3`, and
the leaf is renamed: Conv/Dense `weight` -> `kernel` (OIHW -> HWIO, (out, in) -> (in, out)),
norm `weight` -> `scale`, Embedding `weight` -> `embedding`; `bias` stays `bias`.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

import numpy as np
from flax import traverse_util

from ip2p_jax.errors import Ip2pError

# PyTorch ModuleList / Sequential attributes whose integer children are flattened to `name_i`.
LIST_NAMES = frozenset({
    "down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers",
    "transformer_blocks", "layers", "to_out", "net",
})
# Buffers some checkpoints carry that are not parameters.
IGNORED_TORCH_KEYS = re.compile(r"(^|\.)(position_ids|num_batches_tracked)$")

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


class WeightsError(Ip2pError):
    """A weight file or state dict does not fit the model: says which file and what is wrong."""


def flax_path_to_torch_key(path: tuple[str, ...]) -> str:
    parts = []
    for seg in path[:-1]:
        m = re.fullmatch(r"(.+)_(\d+)", seg)
        if m and m.group(1) in LIST_NAMES:
            parts += [m.group(1), m.group(2)]
        else:
            parts.append(seg)
    leaf = path[-1]
    if leaf not in _LEAF_TO_TORCH:
        raise WeightsError(f"unknown Flax leaf name {leaf!r} at {'/'.join(path)}")
    return ".".join(parts + [_LEAF_TO_TORCH[leaf]])


def _to_flax_leaf(leaf: str, value: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    if leaf == "kernel":
        if value.ndim == 4 and len(target_shape) == 4:
            value = value.transpose(2, 3, 1, 0)          # OIHW -> HWIO
        elif value.ndim == 4 and len(target_shape) == 2 and value.shape[2:] == (1, 1):
            value = value[:, :, 0, 0].T                    # 1x1 conv stored for a Dense
        elif value.ndim == 2:
            value = value.T
    return value


def _to_torch_leaf(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel":
        if value.ndim == 4:
            return value.transpose(3, 2, 0, 1)            # HWIO -> OIHW
        if value.ndim == 2:
            return value.T
    return value


def torch_to_flax(
    state: Mapping[str, Any],
    abstract_params: Mapping[str, Any],
    *,
    source: str = "state dict",
    prefix: str = "",
    dtype=None,
    strict: bool = True,
) -> dict:
    """Build Flax params shaped like `abstract_params` (e.g. from jax.eval_shape) from a torch-named dict.

    `state` maps PyTorch names to numpy-convertible arrays; `prefix` is prepended to every
    torch key looked up. Missing, unexpected (when strict) and mis-shaped keys raise one
    WeightsError naming `source` and the keys.
    """
    flat = traverse_util.flatten_dict(dict(abstract_params))
    out, missing, bad_shape, used = {}, [], [], set()
    for path, target in flat.items():
        key = prefix + flax_path_to_torch_key(path)
        if key not in state:
            missing.append(key)
            continue
        used.add(key)
        value = _to_flax_leaf(path[-1], np.asarray(state[key]), tuple(target.shape))
        if tuple(value.shape) != tuple(target.shape):
            bad_shape.append(f"{key}: file has {tuple(np.asarray(state[key]).shape)}, model expects "
                             f"{tuple(_to_torch_leaf(path[-1], np.zeros(target.shape, np.int8)).shape)}")
            continue
        out[path] = value.astype(dtype or target.dtype)
    unexpected = [k for k in state if k.startswith(prefix) and k not in used
                  and not IGNORED_TORCH_KEYS.search(k)] if strict else []
    if missing or unexpected or bad_shape:
        raise WeightsError(_describe(source, missing, unexpected, bad_shape))
    return traverse_util.unflatten_dict(out)


def flax_to_torch(params: Mapping[str, Any], *, prefix: str = "") -> dict[str, np.ndarray]:
    """The inverse of torch_to_flax: PyTorch names -> numpy arrays in PyTorch layout."""
    flat = traverse_util.flatten_dict(dict(params))
    return {prefix + flax_path_to_torch_key(p): np.ascontiguousarray(_to_torch_leaf(p[-1], np.asarray(v)))
            for p, v in flat.items()}


def _describe(source: str, missing: Iterable[str], unexpected: Iterable[str], bad_shape: Iterable[str]) -> str:
    def some(items, n=8):
        items = list(items)
        s = ", ".join(items[:n])
        return s + (f", ... ({len(items)} in all)" if len(items) > n else "")
    lines = [f"weights in {source} do not fit the model:"]
    if missing:
        lines.append(f"  missing keys: {some(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys: {some(unexpected)}")
    if bad_shape:
        lines.append(f"  mis-shaped keys: {some(bad_shape, 4)}")
    return "\n".join(lines)
