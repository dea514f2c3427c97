"""Reading and writing PyTorch-named state dicts as numpy: safetensors (no torch needed),
sharded safetensors (`*.safetensors.index.json`), and pickles (`.bin`/`.pt`/`.ckpt`, torch needed).

Every failure is one WeightsError naming the file and the problem.
"""
from __future__ import annotations

import json
import os
import pickle
from typing import Any, Mapping

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from ip2p_jax import files
from ip2p_jax.weights.naming import WeightsError

SAFETENSORS = (".safetensors",)
PICKLES = (".bin", ".pt", ".pth", ".ckpt")
INDEX_SUFFIX = ".index.json"


def require_torch(path: str, why: str = "to read PyTorch pickle files"):
    try:
        import torch  # optional heavy dependency (the [torch] extra)
    except ImportError:
        raise WeightsError(f"{path}: torch is needed {why} but is not installed: "
                           "install ip2p_jax[torch] (or convert the file to .safetensors elsewhere)") from None
    return torch


def read_state_dict(path: str, *, trust_pickle: bool = False) -> dict[str, np.ndarray]:
    """All tensors of one weight file (or of a sharded set, given its index .json) as numpy arrays."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: no such file")
    if path.endswith(INDEX_SUFFIX) or (path.endswith(".json") and ".index." in os.path.basename(path)):
        return _read_sharded(path, trust_pickle=trust_pickle)
    if path.endswith(SAFETENSORS):
        return _read_safetensors(path)
    if path.endswith(PICKLES):
        return _read_pickle(path, trust_pickle=trust_pickle)
    raise WeightsError(f"{path}: unknown weight file type (expected .safetensors, a sharded "
                       f"*.safetensors.index.json, or {'/'.join(PICKLES)})")


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    try:
        with safe_open(path, framework="np") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError for truncated / corrupt files; OSError for I/O
        raise WeightsError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); "
                           "it may be truncated or corrupt: download or write it again") from None


def _read_pickle(path: str, *, trust_pickle: bool) -> dict[str, np.ndarray]:
    torch = require_torch(path)
    obj = None
    for mmap in (True, False):  # mmap needs the zip format; old pickles need mmap=False
        try:
            obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=mmap)
            break
        except pickle.UnpicklingError as e:
            raise WeightsError(
                f"{path}: holds Python objects besides tensors, which are not loaded unless trusted "
                f"({str(e).splitlines()[0]}); if you trust the file, pass trust_pickle=True "
                "(`--trust-pickle`)") from None
        except Exception as e:  # RuntimeError from a truncated zip, EOFError, ...
            if mmap and "mmap" in str(e).lower():
                continue
            raise WeightsError(f"{path}: torch.load cannot read it ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}); it may be truncated or corrupt") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]   # PyTorch Lightning checkpoints (the authors' .ckpt)
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: expected a state dict (name -> tensor), found {type(obj).__name__}")
    return {k: _torch_to_numpy(v, torch) for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _torch_to_numpy(t, torch) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bf16; reinterpret the bits
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _read_sharded(index_path: str, *, trust_pickle: bool) -> dict[str, np.ndarray]:
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise WeightsError(f"{index_path}: not a valid shard index (a JSON object with a 'weight_map'): {e}") from None
    folder = os.path.dirname(index_path)
    out: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = os.path.join(folder, shard)
        if not os.path.isfile(shard_path):
            raise WeightsError(f"{index_path}: lists shard {shard}, which is missing from {folder}")
        out.update(read_state_dict(shard_path, trust_pickle=trust_pickle))
    absent = [k for k in weight_map if k not in out]
    if absent:
        raise WeightsError(f"{index_path}: {len(absent)} tensors listed in the index are in no shard "
                           f"(first: {', '.join(absent[:4])})")
    return out


def write_safetensors(state: Mapping[str, Any], path: str, metadata: Mapping[str, str] | None = None) -> None:
    """Write numpy (or jax) arrays; `format: pt` metadata lets diffusers/transformers read the file."""
    arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in state.items()}
    save_file(arrays, path, metadata={"format": "pt", **dict(metadata or {})})


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: no such file")
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise WeightsError(f"{path}: expected a JSON object, found {type(d).__name__}")
    return d


def write_json(d: Mapping[str, Any], path: str) -> None:
    files.write_json(path, dict(d), sort_keys=True)


def find_weights(folder: str, stem: str, variant: str | None = None, pickle_stem: str | None = None) -> str:
    """The weight file of one component folder, in diffusers' order of preference.

    `stem` is `diffusion_pytorch_model` (diffusers) or `model` (transformers), `pickle_stem` the .bin
    name if different (transformers: `pytorch_model`); `variant` e.g. "fp16"
    selects `<stem>.fp16.safetensors`. Without a variant, a folder holding only one variant's
    files (e.g. only fp16) is read too.
    """
    pstem = pickle_stem or stem

    def names(v):
        tag = f".{v}" if v else ""
        return [f"{stem}{tag}.safetensors", f"{stem}.safetensors.index{tag}.json",
                f"{pstem}{tag}.bin", f"{pstem}.bin.index{tag}.json"]

    for name in names(variant):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    present = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    if variant is None:
        variants = sorted({n.split(".")[1] for n in present if n.count(".") == 2 and (
            (n.startswith(stem + ".") and n.endswith(".safetensors")) or (n.startswith(pstem + ".") and n.endswith(".bin")))})
        if len(variants) == 1:
            return find_weights(folder, stem, variants[0], pickle_stem)
    wanted = names(variant)[0]
    raise WeightsError(f"{folder}: no weight file {wanted} (nor sharded or .bin); the folder holds: "
                       f"{', '.join(present) or 'nothing'}")
