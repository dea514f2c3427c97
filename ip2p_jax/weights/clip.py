"""CLIP checkpoints: a transformers CLIPModel folder (text and vision towers, for the CLIP metrics),
and CLIP's two bare PyTorch parameters.

`vision_model.embeddings.class_embedding` and `logit_scale` are `nn.Parameter`s held directly by a
module (no `.weight` leaf): their torch key is the Flax path joined with dots. `params_from_torch` /
`params_to_torch` convert them beside the generic table of ip2p_jax.weights.naming.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from ip2p_jax.errors import Ip2pError
from ip2p_jax.models import clip
from ip2p_jax.tokenizer import load_tokenizer
from ip2p_jax.weights.io import find_weights, read_json, read_state_dict
from ip2p_jax.weights.naming import WeightsError, flax_to_torch, torch_to_flax

BARE_PARAMS = frozenset({"class_embedding", "logit_scale"})


class ClipModelError(WeightsError):
    """A CLIP model folder that is missing, incomplete or unreadable; the message names the path."""


def _split_bare(flat: Mapping[tuple, Any]):
    bare = {p: v for p, v in flat.items() if p[-1] in BARE_PARAMS}
    rest = {p: v for p, v in flat.items() if p[-1] not in BARE_PARAMS}
    return bare, rest


def params_from_torch(state: Mapping[str, Any], abstract: Mapping[str, Any], *, source: str = "state dict",
                      prefix: str = "", dtype=None) -> dict:
    """ip2p_jax.weights.naming.torch_to_flax plus CLIP's bare parameters (class_embedding, logit_scale)."""
    bare, rest = _split_bare(traverse_util.flatten_dict(dict(abstract)))
    bare_keys = {prefix + ".".join(p): p for p in bare}
    out = traverse_util.flatten_dict(torch_to_flax(
        {k: v for k, v in state.items() if k not in bare_keys}, traverse_util.unflatten_dict(rest),
        source=source, prefix=prefix, dtype=dtype))
    problems = []
    for key, path in bare_keys.items():
        if key not in state:
            problems.append(f"missing key {key}")
            continue
        value = np.asarray(state[key])
        if value.shape != tuple(bare[path].shape):
            problems.append(f"{key}: file has {value.shape}, model expects {tuple(bare[path].shape)}")
            continue
        out[path] = value.astype(dtype or bare[path].dtype)
    if problems:
        raise WeightsError(f"weights in {source} do not fit the model: " + "; ".join(problems))
    return traverse_util.unflatten_dict(out)


def params_to_torch(params: Mapping[str, Any], *, prefix: str = "") -> dict[str, np.ndarray]:
    """The inverse of params_from_torch: PyTorch names -> numpy arrays in PyTorch layout."""
    bare, rest = _split_bare(traverse_util.flatten_dict(dict(params)))
    out = flax_to_torch(traverse_util.unflatten_dict(rest), prefix=prefix) if rest else {}
    out.update({prefix + ".".join(p): np.asarray(v) for p, v in bare.items()})
    return out


def load_clip_model(path: str, *, dtype=np.float32):
    """A transformers CLIPModel folder (config.json, model.safetensors or pytorch_model.bin, tokenizer
    files) -> (CLIPConfig, params, tokenizer). Every failure is a ClipModelError naming the path."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ClipModelError(f"{path}: no such CLIP model folder (expected a transformers CLIPModel folder: "
                             "config.json, model.safetensors, tokenizer and preprocessor_config.json)")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ClipModelError(f"{path}: incomplete CLIP model folder: no config.json")
    try:
        raw = read_json(config_path)
        if raw.get("model_type", "clip") != "clip":
            raise ClipModelError(f"{config_path}: model_type={raw['model_type']!r}; the CLIP metrics need a "
                                 "full CLIPModel (model_type 'clip': text and vision towers)")
        config = clip.CLIPConfig.from_dict(raw, source=config_path)
        weights = find_weights(path, "model", pickle_stem="pytorch_model")
        params = params_from_torch(read_state_dict(weights), clip.abstract_params(config), source=weights,
                                   dtype=dtype)
        tokenizer = load_tokenizer(path)
    except ClipModelError:
        raise
    except Ip2pError as e:   # WeightsError, ConfigError, TokenizerError: they name the file
        raise ClipModelError(f"{path}: cannot load the CLIP model: {e}") from None
    return config, params, tokenizer
