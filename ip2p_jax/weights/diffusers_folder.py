"""Diffusers pipeline folders: reading them, and writing ours.

Our own checkpoints ARE diffusers folders (model_index.json; unet/, vae/, text_encoder/ with
config.json + safetensors; tokenizer/; scheduler/). One format serves both directions: diffusers'
`StableDiffusionInstructPix2PixPipeline.from_pretrained(path)` loads what we write, we load what
diffusers and the hub write, and there is no private format to version. Training state (optimizer,
step) lives in orbax checkpoints, not here.
"""
from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version
from typing import Iterable

import numpy as np

from ip2p_jax import dtypes
from ip2p_jax.progress import progress as progress_bar
from ip2p_jax.tokenizer import TokenizerError, load_tokenizer
from ip2p_jax.weights.components import SPECS, Components, align_optional_prefix, cast_params
from ip2p_jax.weights.io import find_weights, read_json, read_state_dict, write_json, write_safetensors
from ip2p_jax.weights.naming import WeightsError, flax_to_torch, torch_to_flax
from ip2p_jax.weights.output_folder import atomic_folder, check_finite  # noqa: F401 (atomic_folder: re-export)

FOLDER_LAYOUT = ("model_index.json, unet/, vae/, text_encoder/ (each with config.json and weights), "
                 "tokenizer/, scheduler/")
IP2P_PIPELINE = "StableDiffusionInstructPix2PixPipeline"
SD_PIPELINE = "StableDiffusionPipeline"
SUPPORTED_CLASSES = {
    "unet": {"UNet2DConditionModel"},
    "vae": {"AutoencoderKL"},
    "text_encoder": {"CLIPTextModel"},
}


def _progress(items: Iterable, desc: str, enabled: bool):
    return progress_bar(list(items), desc=desc, unit="part", enabled=enabled, leave=False)


def load_component(folder: str, name: str, *, dtype=np.float32, variant: str | None = None,
                   trust_pickle: bool = False):
    """(config, params) of one network in `folder/<name>/` (config.json + weights)."""
    spec = SPECS[name]
    sub = os.path.join(folder, spec.folder)
    if not os.path.isdir(sub):
        raise WeightsError(f"{folder}: missing {spec.folder}/ (a diffusers folder holds {FOLDER_LAYOUT})")
    config_path = os.path.join(sub, "config.json")
    config = spec.config_from_dict(read_json(config_path), source=config_path)
    weights_path = find_weights(sub, spec.weights_stem, variant, spec.pickle_stem)
    state = read_state_dict(weights_path, trust_pickle=trust_pickle)
    return config, state_to_params(state, name, config, dtype=dtype, source=weights_path), weights_path


def state_to_params(state, name: str, config, *, dtype=np.float32, source: str) -> dict:
    """PyTorch-named arrays of network `name` -> our Flax params (numpy), checked against the config."""
    spec = SPECS[name]
    abstract = spec.abstract_params(config)
    state = align_optional_prefix(state, spec, abstract)
    return torch_to_flax(state, abstract, source=source, dtype=dtypes.numpy_dtype(dtype))


def params_to_state(params, name: str) -> dict[str, np.ndarray]:
    """Our Flax params -> PyTorch-named arrays in the names the reference libraries write."""
    spec = SPECS[name]
    state = flax_to_torch(params)
    pre = spec.optional_prefix
    return {(k if k.startswith(pre) else pre + k): v for k, v in state.items()} if pre else state


def _check_model_index(folder: str) -> dict:
    path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(path):
        return {}
    index = read_json(path)
    for name, classes in SUPPORTED_CLASSES.items():
        entry = index.get(name)
        if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None and entry[1] not in classes:
            raise WeightsError(f"{path}: {name} is a {entry[1]}; ip2p_jax supports {', '.join(sorted(classes))}")
    return index


def load_diffusers_folder(path: str, dtype=np.float32, variant: str | None = None, *,
                          trust_pickle: bool = False, progress: bool = False) -> Components:
    """A diffusers Stable Diffusion / InstructPix2Pix folder (or one we wrote) -> Components.

    Weights are read from `<stem>.safetensors` (no torch needed), sharded safetensors, or `.bin`
    (torch needed); `variant="fp16"` picks `<stem>.fp16.safetensors`. Params are cast to `dtype`.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise WeightsError(f"{path}: no such folder")
    _check_model_index(path)
    loaded, notes = {}, []
    for name in _progress(SPECS, f"loading {os.path.basename(path.rstrip('/'))}", progress):
        config, params, weights_path = load_component(path, name, dtype=dtype, variant=variant,
                                                      trust_pickle=trust_pickle)
        loaded[name] = (config, params)
        notes.append(f"{name}: read {os.path.relpath(weights_path, path)}")
    try:
        tokenizer = load_tokenizer(path)
    except TokenizerError as e:
        raise WeightsError(str(e)) from None
    scheduler_config = read_json(_scheduler_config_path(path))
    return Components(unet_config=loaded["unet"][0], unet_params=loaded["unet"][1],
                      vae_config=loaded["vae"][0], vae_params=loaded["vae"][1],
                      text_config=loaded["text_encoder"][0], text_params=loaded["text_encoder"][1],
                      tokenizer=tokenizer, scheduler_config=scheduler_config, source=path, notes=notes)


def _scheduler_config_path(path: str) -> str:
    p = os.path.join(path, "scheduler", "scheduler_config.json")
    if not os.path.isfile(p):
        raise WeightsError(f"{path}: missing scheduler/scheduler_config.json (a diffusers folder holds "
                           f"{FOLDER_LAYOUT})")
    return p


def config_dict(name: str, config) -> dict:
    """The reference config.json dict of a network config (adds the class tags readers need)."""
    d = dict(config.to_dict())
    spec = SPECS[name]
    if spec.library == "diffusers":
        d.setdefault("_class_name", spec.reference_class)
    else:
        d.setdefault("architectures", [spec.reference_class])
        d.setdefault("model_type", "clip_text_model")
    return d


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "0.0.0"


def model_index(components: Components) -> dict:
    in_channels = components.unet_config.in_channels
    return {
        "_class_name": IP2P_PIPELINE if in_channels == 8 else SD_PIPELINE,
        "_diffusers_version": _version("diffusers"),
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", type(components.tokenizer).__name__ if components.tokenizer is not None
                      else "CLIPTokenizer"],
        "scheduler": ["diffusers", components.scheduler_config.get("_class_name", "EulerAncestralDiscreteScheduler")],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
    }


def _leaf_values(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaf_values(v)
    else:
        yield tree


def save_diffusers_folder(components: Components, path: str, *, dtype=None, overwrite: bool = False,
                          progress: bool = False, protect: Iterable[str] = ()) -> str:
    """Write `components` as a diffusers pipeline folder (atomically); returns the folder.

    `dtype` (None: as they are) casts the params written. The tokenizer must be a transformers
    tokenizer (save_pretrained). What the target may be, and `overwrite` / `protect`: see
    output_folder.py. Non-finite weights are refused before anything is written.
    """
    if components.tokenizer is None:
        raise WeightsError(f"{path}: cannot write a complete model folder without a tokenizer")
    params_all = components.params()
    if dtype is not None:
        params_all = {k: cast_params(v, dtype) for k, v in params_all.items()}
    check_finite(params_all, os.path.abspath(path))
    need = sum(np.asarray(x).nbytes for tree in params_all.values() for x in _leaf_values(tree))
    with atomic_folder(path, overwrite=overwrite, protect=protect, need_bytes=need) as tmp:
        for name in _progress(list(SPECS) + ["tokenizer", "scheduler"], f"writing {os.path.basename(path)}",
                              progress):
            sub = os.path.join(tmp, name)
            os.makedirs(sub)
            if name in SPECS:
                params = params_all[name]
                write_json(config_dict(name, components.configs()[name]), os.path.join(sub, "config.json"))
                write_safetensors(params_to_state(params, name),
                                  os.path.join(sub, SPECS[name].weights_stem + ".safetensors"))
            elif name == "tokenizer":
                components.tokenizer.save_pretrained(sub)
            else:
                write_json(components.scheduler_config, os.path.join(sub, "scheduler_config.json"))
        write_json(model_index(components), os.path.join(tmp, "model_index.json"))
    return os.path.abspath(path)
