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
from ip2p_jax.weights.components import ALL_SPECS, SDXL_SPECS, SPECS, Components, align_optional_prefix, cast_params
from ip2p_jax.weights.io import find_weights, read_json, read_state_dict, write_json, write_safetensors
from ip2p_jax.weights.naming import WeightsError, flax_to_torch, torch_to_flax
from ip2p_jax.weights.output_folder import atomic_folder, check_finite  # noqa: F401 (atomic_folder: re-export)

FOLDER_LAYOUT = ("model_index.json, unet/, vae/, text_encoder/ (each with config.json and weights), "
                 "tokenizer/, scheduler/")
IP2P_PIPELINE = "StableDiffusionInstructPix2PixPipeline"
SD_PIPELINE = "StableDiffusionPipeline"
SDXL_IP2P_PIPELINE = "StableDiffusionXLInstructPix2PixPipeline"
SDXL_PIPELINE = "StableDiffusionXLPipeline"
SDXL_LAYOUT = "an SDXL folder also holds text_encoder_2/ (CLIPTextModelWithProjection) and tokenizer_2/"
SUPPORTED_CLASSES = {
    "unet": {"UNet2DConditionModel"},
    "vae": {"AutoencoderKL"},
    "text_encoder": {"CLIPTextModel"},
    "text_encoder_2": {"CLIPTextModelWithProjection"},
}
# model_index.json settings of SDXL InstructPix2Pix pipelines that change an edit (diffusers' defaults)
SDXL_PIPELINE_DEFAULTS = {"force_zeros_for_empty_prompt": True, "is_cosxl_edit": False}


def _progress(items: Iterable, desc: str, enabled: bool):
    return progress_bar(list(items), desc=desc, unit="part", enabled=enabled, leave=False)


def load_component(folder: str, name: str, *, dtype=np.float32, variant: str | None = None,
                   trust_pickle: bool = False):
    """(config, params) of one network in `folder/<name>/` (config.json + weights)."""
    spec = ALL_SPECS[name]
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
    spec = ALL_SPECS[name]
    abstract = spec.abstract_params(config)
    state = align_optional_prefix(state, spec, abstract)
    return torch_to_flax(state, abstract, source=source, dtype=dtypes.numpy_dtype(dtype))


def params_to_state(params, name: str) -> dict[str, np.ndarray]:
    """Our Flax params -> PyTorch-named arrays in the names the reference libraries write."""
    spec = ALL_SPECS[name]
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
    index = _check_model_index(path)
    sdxl = _is_sdxl_folder(path, index)
    names = list(SPECS) + (list(SDXL_SPECS) if sdxl else [])
    loaded, notes = {}, []
    for name in _progress(names, f"loading {os.path.basename(path.rstrip('/'))}", progress):
        config, params, weights_path = load_component(path, name, dtype=dtype, variant=variant,
                                                      trust_pickle=trust_pickle)
        loaded[name] = (config, params)
        notes.append(f"{name}: read {os.path.relpath(weights_path, path)}")
    try:
        tokenizer = load_tokenizer(path)
        tokenizer_2 = load_tokenizer(os.path.join(path, "tokenizer_2")) if sdxl else None
    except TokenizerError as e:
        raise WeightsError(str(e)) from None
    scheduler_config = read_json(_scheduler_config_path(path))
    text2 = loaded.get("text_encoder_2", (None, None))
    pipeline_config = {k: index.get(k, v) for k, v in SDXL_PIPELINE_DEFAULTS.items()} if sdxl else {}
    components = Components(unet_config=loaded["unet"][0], unet_params=loaded["unet"][1],
                            vae_config=loaded["vae"][0], vae_params=loaded["vae"][1],
                            text_config=loaded["text_encoder"][0], text_params=loaded["text_encoder"][1],
                            tokenizer=tokenizer, scheduler_config=scheduler_config, source=path, notes=notes,
                            text2_config=text2[0], text2_params=text2[1], tokenizer_2=tokenizer_2,
                            pipeline_config=pipeline_config)
    check_text_conditioning(components, path)
    return components


def _is_sdxl_folder(path: str, index: dict) -> bool:
    """Whether `path` is an SDXL folder: model_index.json names text_encoder_2 or an SDXL pipeline
    class, or (no model_index.json) text_encoder_2/ exists. A half-SDXL folder is an error."""
    entry = index.get("text_encoder_2")
    listed = isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None
    sdxl_class = str(index.get("_class_name", "")).startswith("StableDiffusionXL")
    has_folder = os.path.isdir(os.path.join(path, "text_encoder_2"))
    index_path = os.path.join(path, "model_index.json")
    if sdxl_class and not listed:
        raise WeightsError(f"{index_path}: an {index['_class_name']} without a text_encoder_2 entry "
                           f"({SDXL_LAYOUT})")
    if listed and not sdxl_class and index.get("_class_name"):
        raise WeightsError(f"{index_path}: a {index['_class_name']} (Stable Diffusion) listing text_encoder_2, "
                           "an SDXL part: this folder mixes SD and SDXL parts")
    sdxl = listed or (not index and has_folder)
    if sdxl:
        for part in ("text_encoder_2", "tokenizer_2"):
            if not os.path.isdir(os.path.join(path, part)):
                raise WeightsError(f"{path}: missing {part}/ ({SDXL_LAYOUT})")
    return sdxl


def check_text_conditioning(components: Components, source: str) -> None:
    """WeightsError naming the file unless the UNet's text conditioning fits the text encoders:
    cross_attention_dim = the encoders' hidden sizes (summed for SDXL), and an SDXL UNet
    (addition_embed_type "text_time") with exactly the second encoder's projection size."""
    u, t1, t2 = components.unet_config, components.text_config, components.text2_config
    unet_json = os.path.join(source, "unet", "config.json")
    if u.text_time and t2 is None:
        raise WeightsError(f"{unet_json}: the UNet expects SDXL conditioning (addition_embed_type "
                           f"'text_time': pooled text embeds and time ids) but {source} has no text_encoder_2 "
                           f"({SDXL_LAYOUT})")
    if t2 is not None and not u.text_time:
        raise WeightsError(f"{unet_json}: a Stable Diffusion UNet (no addition_embed_type 'text_time') in an "
                           f"SDXL folder with text_encoder_2: this folder mixes SD and SDXL parts")
    want = t1.hidden_size + (t2.hidden_size if t2 is not None else 0)
    if u.cross_attention_dim != want:
        parts = "text_encoder + text_encoder_2 hidden sizes" if t2 is not None else "text_encoder hidden_size"
        raise WeightsError(f"{unet_json}: cross_attention_dim={u.cross_attention_dim} but the {parts} give "
                           f"{want}: the UNet and text encoders are from different models")
    if t2 is not None and u.pooled_dim != t2.projection_dim:
        raise WeightsError(f"{unet_json}: projection_class_embeddings_input_dim="
                           f"{u.projection_class_embeddings_input_dim} expects pooled text embeds of "
                           f"{u.pooled_dim}, but text_encoder_2 projects to {t2.projection_dim}")


def _scheduler_config_path(path: str) -> str:
    p = os.path.join(path, "scheduler", "scheduler_config.json")
    if not os.path.isfile(p):
        raise WeightsError(f"{path}: missing scheduler/scheduler_config.json (a diffusers folder holds "
                           f"{FOLDER_LAYOUT})")
    return p


def config_dict(name: str, config) -> dict:
    """The reference config.json dict of a network config (adds the class tags readers need)."""
    d = dict(config.to_dict())
    spec = ALL_SPECS[name]
    if spec.library == "diffusers":
        d.setdefault("_class_name", spec.reference_class)
    else:
        d["architectures"] = [spec.reference_class]
        d.setdefault("model_type", "clip_text_model")
    return d


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "0.0.0"


def model_index(components: Components) -> dict:
    in_channels = components.unet_config.in_channels
    if components.is_sdxl:
        return _sdxl_model_index(components)
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


def _tokenizer_class(tokenizer) -> str:
    return type(tokenizer).__name__ if tokenizer is not None else "CLIPTokenizer"


def _sdxl_model_index(components: Components) -> dict:
    """diffusers' StableDiffusionXL(InstructPix2Pix)Pipeline model_index.json."""
    edit = components.unet_config.in_channels == 2 * components.vae_config.latent_channels
    out = {
        "_class_name": SDXL_IP2P_PIPELINE if edit else SDXL_PIPELINE,
        "_diffusers_version": _version("diffusers"),
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", _tokenizer_class(components.tokenizer)],
        "tokenizer_2": ["transformers", _tokenizer_class(components.tokenizer_2)],
        "scheduler": ["diffusers", components.scheduler_config.get("_class_name", "EulerDiscreteScheduler")],
        "force_zeros_for_empty_prompt": bool(components.pipeline_config.get("force_zeros_for_empty_prompt", True)),
    }
    if components.pipeline_config.get("is_cosxl_edit"):
        out["is_cosxl_edit"] = True
    return out


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
    if components.tokenizer is None or (components.is_sdxl and components.tokenizer_2 is None):
        raise WeightsError(f"{path}: cannot write a complete model folder without a tokenizer")
    params_all = components.params()
    if dtype is not None:
        params_all = {k: cast_params(v, dtype) for k, v in params_all.items()}
    check_finite(params_all, os.path.abspath(path))
    need = sum(np.asarray(x).nbytes for tree in params_all.values() for x in _leaf_values(tree))
    parts = list(params_all) + ["tokenizer"] + (["tokenizer_2"] if components.is_sdxl else []) + ["scheduler"]
    with atomic_folder(path, overwrite=overwrite, protect=protect, need_bytes=need) as tmp:
        for name in _progress(parts, f"writing {os.path.basename(path)}", progress):
            sub = os.path.join(tmp, name)
            os.makedirs(sub)
            if name in ALL_SPECS:
                params = params_all[name]
                write_json(config_dict(name, components.configs()[name]), os.path.join(sub, "config.json"))
                write_safetensors(params_to_state(params, name),
                                  os.path.join(sub, ALL_SPECS[name].weights_stem + ".safetensors"))
            elif name == "tokenizer":
                components.tokenizer.save_pretrained(sub)
            elif name == "tokenizer_2":
                components.tokenizer_2.save_pretrained(sub)
            else:
                write_json(components.scheduler_config, os.path.join(sub, "scheduler_config.json"))
        write_json(model_index(components), os.path.join(tmp, "model_index.json"))
    return os.path.abspath(path)
