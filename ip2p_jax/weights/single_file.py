"""Single-file checkpoints in the original latent-diffusion layout (`.ckpt` / `.safetensors`):
`model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE), `cond_stage_model.transformer.*`
(CLIP text encoder; Stable Diffusion 2.x: `cond_stage_model.model.*`, an OpenCLIP text encoder),
optionally `model_ema.*` (the UNet's EMA weights, e.g. the authors' instruct-pix2pix-00-22000.ckpt).
SDXL files hold `conditioner.embedders.0.transformer.*` (CLIP ViT-L) and
`conditioner.embedders.1.model.*` (OpenCLIP ViT-bigG with its projection) instead; they need
`config=` an SDXL diffusers folder.

Reading reuses diffusers' own key converters (diffusers.loaders.single_file_utils; that module
imports torch, so single files need ip2p_jax[torch]). Writing (`save_single_file`) inverts them:
candidate original names are derived from the diffusers names, then diffusers' converter is run on a
probe whose values are the candidates' indices, so the final name table is the converter's own.
"""
from __future__ import annotations

import dataclasses
import os
import re
from types import SimpleNamespace
from typing import Any, Callable, Mapping

import numpy as np

from ip2p_jax import dtypes
from ip2p_jax.progress import progress as progress_bar
from ip2p_jax.tokenizer import TokenizerError, load_tokenizer
from ip2p_jax.weights.components import ALL_SPECS, SDXL_SPECS, SPECS, Components
from ip2p_jax.weights.diffusers_folder import (SDXL_PIPELINE_DEFAULTS, check_text_conditioning, config_dict,
                                               params_to_state, state_to_params)
from ip2p_jax.weights.hub import SD_TOKENIZER_REPO, download_tokenizer
from ip2p_jax.weights.io import read_json, read_state_dict, require_torch, write_safetensors
from ip2p_jax.weights.naming import WeightsError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."   # Stable Diffusion 2.x's OpenCLIP ViT-H text encoder
SDXL_TEXT_PREFIX = "conditioner.embedders.0.transformer."   # SDXL: CLIP ViT-L (text_encoder)
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."    # SDXL: OpenCLIP ViT-bigG (text_encoder_2)
EMA_PREFIX = "model_ema."
EMA_BUFFERS = ("model_ema.decay", "model_ema.num_updates")

# Stable Diffusion 1.5's networks (diffusers / transformers config.json values); the UNet's
# in_channels is read from the checkpoint (4: Stable Diffusion, 8: InstructPix2Pix).
SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": 8, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "norm_num_groups": 32, "norm_eps": 1e-5, "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0,
    "use_linear_projection": False, "upcast_attention": False,
}
SD15_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2, "norm_num_groups": 32, "act_fn": "silu", "sample_size": 512, "scaling_factor": 0.18215,
}
SD15_TEXT = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5, "projection_dim": 768, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}
# The scheduler InstructPix2Pix edits with (Euler ancestral on SD's training betas).
DEFAULT_SCHEDULER = {
    "_class_name": "EulerAncestralDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
    "timestep_spacing": "linspace", "steps_offset": 1, "trained_betas": None,
}


def _converters(path: str):
    require_torch(path, "for diffusers' single-file converters (diffusers.loaders.single_file_utils)")
    from diffusers.loaders import single_file_utils as sfu  # optional heavy dependency (imports torch)

    return sfu


def ema_key(key: str) -> str:
    """The LitEma buffer name of a `model.diffusion_model.*` weight: dots after `model.` removed."""
    return EMA_PREFIX + "".join(key.split(".")[1:])


# ----------------------------------------------------------------------------- reading

def select_unet_weights(ckpt: Mapping[str, Any], prefer_ema: bool, source: str) -> tuple[dict, str]:
    """The UNet's `model.diffusion_model.*` tensors, EMA values substituted when present and preferred."""
    unet = {k: v for k, v in ckpt.items() if k.startswith(UNET_PREFIX)}
    if not unet:
        sample = ", ".join(list(ckpt)[:4]) or "no tensors"
        raise WeightsError(f"{source}: not a Stable Diffusion checkpoint in the original layout: no "
                           f"{UNET_PREFIX}* keys (found {sample}, ...)")
    ema_present = [k for k in ckpt if k.startswith(EMA_PREFIX) and k not in EMA_BUFFERS]
    if not ema_present:
        return unet, "UNet: the only weights in the file (no model_ema.*)"
    if not prefer_ema:
        return unet, "UNet: non-EMA weights (model.diffusion_model.*), as asked; the file also holds EMA weights"
    missing = [k for k in unet if ema_key(k) not in ckpt]
    if missing:
        raise WeightsError(f"{source}: holds EMA weights for only {len(unet) - len(missing)} of {len(unet)} UNet "
                           f"tensors (no {ema_key(missing[0])} for {missing[0]}); load the non-EMA weights "
                           "with prefer_ema=False (--no-ema)")
    return {k: ckpt[ema_key(k)] for k in unet}, "UNet: EMA weights (model_ema.*)"


def ldm_to_diffusers(ckpt: Mapping[str, Any], unet_config: Mapping, vae_config: Mapping, *,
                     prefer_ema: bool = True, source: str = "checkpoint",
                     text_config: Mapping | None = None, text2_config: Mapping | None = None) -> tuple[dict, str]:
    """{'unet' | 'vae' | 'text_encoder' (| 'text_encoder_2'): diffusers/transformers-named state} via
    diffusers' converters. An OpenCLIP text encoder (SD 2.x) needs `text_config` (its transformers
    CLIPTextConfig dict); an SDXL file's second encoder needs `text2_config`."""
    sfu = _converters(source)
    unet, note = select_unet_weights(ckpt, prefer_ema, source)
    states = {
        "unet": sfu.convert_ldm_unet_checkpoint(unet, dict(unet_config), extract_ema=False),
        "vae": sfu.convert_ldm_vae_checkpoint({k: v for k, v in ckpt.items() if k.startswith(tuple(sfu.LDM_VAE_KEYS))},
                                              dict(vae_config)),
        "text_encoder": sfu.convert_ldm_clip_checkpoint(
            {k: v for k, v in ckpt.items() if k.startswith(tuple(sfu.LDM_CLIP_PREFIX_TO_REMOVE))}),
    }
    # diffusers' converters write None for an original name the file lacks: report those as missing.
    states = {name: {k: v for k, v in st.items() if v is not None} for name, st in states.items()}
    if not states["vae"]:
        raise WeightsError(f"{source}: no VAE weights ({VAE_PREFIX}*)")
    if not states["text_encoder"] and any(k.startswith(OPEN_CLIP_PREFIX) for k in ckpt):
        states["text_encoder"], clip_note = open_clip_to_transformers(sfu, ckpt, text_config or {}, source)
        note = f"{note}; {clip_note}"
    if is_sdxl_file(ckpt):
        if text2_config is None:
            raise WeightsError(f"{source}: an SDXL checkpoint ({SDXL_OPEN_CLIP_PREFIX}*): pass config=<an SDXL "
                               "diffusers folder of the same model> (--config FOLDER)")
        states["text_encoder_2"], _ = open_clip_to_transformers(sfu, ckpt, text2_config, source,
                                                                prefix=SDXL_OPEN_CLIP_PREFIX, projection=True)
    if not states["text_encoder"]:
        raise WeightsError(f"{source}: no CLIP text encoder weights ({TEXT_PREFIX}* or {OPEN_CLIP_PREFIX}*)")
    return states, note


def is_sdxl_file(ckpt: Mapping[str, Any]) -> bool:
    return any(k.startswith(SDXL_OPEN_CLIP_PREFIX) for k in ckpt)


def open_clip_to_transformers(sfu, ckpt: Mapping[str, Any], text_config: Mapping, source: str, *,
                              prefix: str = OPEN_CLIP_PREFIX, projection: bool = False) -> tuple[dict, str]:
    """An OpenCLIP text encoder (SD 2.x: `cond_stage_model.model.*`) -> transformers CLIPTextModel
    names (projection=True: CLIPTextModelWithProjection's, SDXL's second encoder), by diffusers'
    convert_open_clip_checkpoint (q/k/v split from in_proj at the hidden size). SD 2.x conditions
    on the penultimate OpenCLIP layer, so its text_encoder config has one layer fewer than the
    file: layers from num_hidden_layers on (and without projection the text_projection) are dropped."""
    import torch  # optional heavy dependency, present: the converters need it

    hidden = int(text_config.get("hidden_size") or np.shape(ckpt[prefix + "token_embedding.weight"])[1])
    layers = text_config.get("num_hidden_layers")
    sub = {k: torch.as_tensor(np.asarray(v)) for k, v in ckpt.items() if k.startswith(prefix)}
    state = sfu.convert_open_clip_checkpoint(SimpleNamespace(config=SimpleNamespace(hidden_size=hidden)), sub,
                                             prefix=prefix)
    out, dropped = {}, set()
    for key, value in state.items():
        m = re.match(r"text_model\.encoder\.layers\.(\d+)\.", key)
        if (key.startswith("text_projection") and not projection) or (
                m and layers is not None and int(m.group(1)) >= layers):
            dropped.add(m.group(1) if m else "text_projection")
            continue
        out[key] = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
    note = "text encoder: OpenCLIP (SD 2.x) converted"
    if dropped:
        note += f" (not used: {', '.join(sorted(f'layer {d}' if d.isdigit() else d for d in dropped))})"
    if not out:
        raise WeightsError(f"{source}: no OpenCLIP text encoder weights under {prefix}")
    return out, note


def _configs(config, ckpt: Mapping[str, Any], source: str) -> tuple[dict, dict, Any, Any]:
    """(reference config dicts per network, notes, tokenizer source, scheduler config) from `config`:
    None (SD 1.5 with in_channels from the file), a model folder, or {'unet'|'vae'|'text_encoder': dict}."""
    if isinstance(config, (str, os.PathLike)):
        folder = os.fspath(config)
        parts = list(ALL_SPECS) if is_sdxl_file(ckpt) else list(SPECS)
        dicts = {name: read_json(os.path.join(folder, ALL_SPECS[name].folder, "config.json")) for name in parts}
        sched = os.path.join(folder, "scheduler", "scheduler_config.json")
        return dicts, [f"configs: {folder}"], folder, read_json(sched) if os.path.isfile(sched) else None
    given = dict(config or {})
    unknown = set(given) - set(SPECS)
    if unknown:
        raise WeightsError(f"config: unknown parts {sorted(unknown)}; expected some of {list(SPECS)}")
    notes = []
    conv_in = ckpt.get(UNET_PREFIX + "input_blocks.0.0.weight")
    unet = dict(SD15_UNET, in_channels=int(conv_in.shape[1]) if conv_in is not None else 4)
    defaults = {"unet": unet, "vae": SD15_VAE, "text_encoder": SD15_TEXT}
    dicts = {}
    for name in SPECS:
        value = given.get(name)
        if value is None:
            dicts[name] = dict(defaults[name])
            notes.append(f"{name}: Stable Diffusion 1.5 config" + (
                f" with in_channels={unet['in_channels']} from the file" if name == "unet" else ""))
        else:
            dicts[name] = config_dict(name, value) if hasattr(value, "to_dict") else dict(value)
    return dicts, notes, None, None


def _tokenizer(tokenizer, folder_hint):
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    try:
        if tokenizer is not None:
            return load_tokenizer(os.fspath(tokenizer))
        if folder_hint is not None:
            return load_tokenizer(folder_hint)
    except TokenizerError as e:
        raise WeightsError(str(e)) from None
    try:
        return load_tokenizer(download_tokenizer())
    except WeightsError as e:
        raise WeightsError(f"a single-file checkpoint holds no tokenizer: pass a tokenizer folder (tokenizer=..., "
                           f"--tokenizer), e.g. a download of {SD_TOKENIZER_REPO}; fetching it failed: {e}") from None


def load_single_file(path: str, config=None, prefer_ema: bool = True, *, dtype=np.float32, tokenizer=None,
                     trust_pickle: bool = False, progress: bool = False) -> Components:
    """A Stable Diffusion / InstructPix2Pix single-file checkpoint -> Components.

    config: None (SD 1.5 networks, the UNet's in_channels read from conv_in: 8 for InstructPix2Pix),
    a diffusers model folder whose configs/tokenizer/scheduler apply, or a dict of per-network
    configs ('unet' / 'vae' / 'text_encoder': config dicts or our config dataclasses).
    prefer_ema: take the UNet's `model_ema.*` weights when the file has them.
    tokenizer: a tokenizer, or a folder holding one; default: the config folder's, else CLIP
    ViT-L/14's from the hub.
    """
    path = os.fspath(path)
    ckpt = read_state_dict(path, trust_pickle=trust_pickle)
    sdxl = is_sdxl_file(ckpt)
    if sdxl and not isinstance(config, (str, os.PathLike)):
        raise WeightsError(f"{path}: an SDXL checkpoint ({SDXL_OPEN_CLIP_PREFIX}*): pass config=<an SDXL diffusers "
                           "folder of the same model> (--config FOLDER); its configs and tokenizers apply")
    dicts, notes, tok_folder, sched = _configs(config, ckpt, path)
    configs = {}
    for name in dicts:
        source = (os.path.join(os.fspath(config), ALL_SPECS[name].folder, "config.json")
                  if isinstance(config, (str, os.PathLike)) else f"{path} ({name} config)")
        configs[name] = ALL_SPECS[name].config_from_dict(dicts[name], source=source)
    ref_dicts = {name: config_dict(name, c) for name, c in configs.items()}
    states, ema_note = ldm_to_diffusers(ckpt, ref_dicts["unet"], ref_dicts["vae"], prefer_ema=prefer_ema, source=path,
                                        text_config=ref_dicts["text_encoder"],
                                        text2_config=ref_dicts.get("text_encoder_2"))
    del ckpt
    tokenizer = _tokenizer(tokenizer, tok_folder)   # before the long part, so a missing one fails fast
    tokenizer_2 = _tokenizer(os.path.join(tok_folder, "tokenizer_2"), None) if sdxl else None
    params = {}
    for name in progress_bar(list(configs), desc=f"converting {os.path.basename(path)}", unit="part",
                             enabled=progress, leave=False):
        try:
            params[name] = state_to_params(states.pop(name), name, configs[name], dtype=dtype,
                                           source=f"{path} ({name}, names as diffusers' converter gives them)")
        except WeightsError as e:
            hint = ("" if config is not None else
                    "\n  (the file does not fit Stable Diffusion 1.5's networks: pass its configs, e.g. "
                    "config=<a diffusers folder of the same model> / --config FOLDER)")
            raise WeightsError(f"{e}{hint}") from None
    pipeline_config = {}
    if sdxl:
        index_path = os.path.join(os.fspath(config), "model_index.json")
        index = read_json(index_path) if os.path.isfile(index_path) else {}
        pipeline_config = {k: index.get(k, v) for k, v in SDXL_PIPELINE_DEFAULTS.items()}
    components = Components(unet_config=configs["unet"], unet_params=params["unet"],
                            vae_config=configs["vae"], vae_params=params["vae"],
                            text_config=configs["text_encoder"], text_params=params["text_encoder"],
                            tokenizer=tokenizer, scheduler_config=dict(sched or DEFAULT_SCHEDULER),
                            source=path, notes=[ema_note] + notes, text2_config=configs.get("text_encoder_2"),
                            text2_params=params.get("text_encoder_2"), tokenizer_2=tokenizer_2,
                            pipeline_config=pipeline_config)
    check_text_conditioning(components, os.fspath(config) if isinstance(config, (str, os.PathLike)) else path)
    return components


# ----------------------------------------------------------------------------- writing

_RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                  "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_VAE_ATTN_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _first(rest: str, table: Mapping[str, str]) -> str:
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def _unet_ldm_guess(config: Mapping) -> Callable[[str], str]:
    mapping = _converters("UNet export").DIFFUSERS_TO_LDM_MAPPING["unet"]
    fixed = dict(mapping["layers"])
    if config.get("addition_embed_type") == "text_time":   # SDXL's add_embedding is label_emb
        fixed.update(mapping["addition_embed_type"])
    per = int(config["layers_per_block"]) + 1                      # LDM blocks per diffusers block
    attn_up = {i for i, t in enumerate(config["up_block_types"]) if t.startswith("CrossAttn")}

    def guess(key: str) -> str:
        if key in fixed:
            return fixed[key]
        m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", key)
        if m:
            side, b, kind, i, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
            if side == "down":
                if kind == "downsamplers":
                    return f"input_blocks.{(b + 1) * per}.0.op.{rest.removeprefix('conv.')}"
                sub = "0." + _first(rest, _RESNET_TO_LDM) if kind == "resnets" else "1." + rest
                return f"input_blocks.{1 + b * per + i}.{sub}"
            if kind == "upsamplers":
                return f"output_blocks.{b * per + per - 1}.{2 if b in attn_up else 1}.{rest}"
            sub = "0." + _first(rest, _RESNET_TO_LDM) if kind == "resnets" else "1." + rest
            return f"output_blocks.{b * per + i}.{sub}"
        m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
        if m:
            i, rest = int(m.group(2)), m.group(3)
            return (f"middle_block.{2 * i}.{_first(rest, _RESNET_TO_LDM)}" if m.group(1) == "resnets"
                    else f"middle_block.{2 * i + 1}.{rest}")
        return key

    return guess


def _vae_ldm_guess(config: Mapping) -> Callable[[str], str]:
    fixed = dict(_converters("VAE export").DIFFUSERS_TO_LDM_MAPPING["vae"])
    n = len(config["block_out_channels"])

    def guess(key: str) -> str:
        if key in fixed:
            return fixed[key]
        m = re.fullmatch(r"(encoder\.down|decoder\.up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)", key)
        if m:
            part, b, kind, i, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
            level = b if part == "encoder.down" else n - 1 - b
            if kind == "resnets":
                return f"{part}.{level}.block.{i}.{_first(rest, {'conv_shortcut': 'nin_shortcut'})}"
            return f"{part}.{level}.{'downsample' if kind == 'downsamplers' else 'upsample'}.{rest}"
        m = re.fullmatch(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
        if m:
            half, kind, i, rest = m.groups()
            if kind == "resnets":
                return f"{half}.mid.block_{int(i) + 1}.{_first(rest, {'conv_shortcut': 'nin_shortcut'})}"
            return f"{half}.mid.attn_{int(i) + 1}.{_first(rest, _VAE_ATTN_TO_LDM)}"
        return key

    return guess


def inverse_names(keys: list[str], guess: Callable[[str], str], convert: Callable[[dict], dict],
                  prefix: str, what: str) -> dict[str, str]:
    """{diffusers name: original name}, as diffusers' converter `convert` maps them.

    Candidate original names come from `guess`; the probe gives candidate i the value i, so after
    `convert` each diffusers name holds the index of the original name it was read from.
    """
    candidates = [prefix + guess(k) for k in keys]
    probe = {c: np.full((1,), i, np.int64) for i, c in enumerate(candidates)}
    converted = convert(probe)
    table = {k: candidates[int(np.asarray(v).reshape(-1)[0])] for k, v in converted.items() if v is not None}
    if set(table) != set(keys) or len(set(table.values())) != len(keys):
        lost = sorted(set(keys) - set(table))
        raise WeightsError(f"cannot write the {what} in the original layout: diffusers' converter does not read "
                           f"back {len(lost)} of {len(keys)} tensors (e.g. {', '.join(lost[:3])})")
    return table


def original_names(name: str, keys: list[str], config: Mapping, sdxl: bool = False) -> dict[str, str]:
    """{diffusers / transformers name: original single-file name} for network `name` with the
    reference config dict `config` (sdxl: in an SDXL file; text_encoder_2 is written by
    transformers_to_open_clip)."""
    if name == "text_encoder":
        return {k: (SDXL_TEXT_PREFIX if sdxl else TEXT_PREFIX) + k for k in keys}
    sfu = _converters("single-file export")
    if name == "unet":
        return inverse_names(keys, _unet_ldm_guess(config), lambda p: sfu.convert_ldm_unet_checkpoint(p, config),
                             UNET_PREFIX, "UNet")
    return inverse_names(keys, _vae_ldm_guess(config), lambda p: sfu.convert_ldm_vae_checkpoint(p, config),
                         VAE_PREFIX, "VAE")


def diffusers_to_ldm(components: Components) -> dict[str, np.ndarray]:
    """Components -> one original-layout state dict (numpy, PyTorch layouts)."""
    out = {}
    for name, config in components.configs().items():
        state = params_to_state(components.params()[name], name)
        if name in SDXL_SPECS:
            out.update(transformers_to_open_clip(state, config.hidden_size, SDXL_OPEN_CLIP_PREFIX))
            continue
        names = original_names(name, list(state), config_dict(name, config), sdxl=components.is_sdxl)
        for k, v in state.items():
            # the original VAE attention projections are 1x1 convs
            if v.ndim == 2 and re.search(r"\.attn_\d+\.(q|k|v|proj_out)\.weight$", names[k]):
                v = v[:, :, None, None]
            out[names[k]] = v
    return out


_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}


def transformers_to_open_clip(state: Mapping[str, np.ndarray], hidden: int, prefix: str) -> dict[str, np.ndarray]:
    """transformers CLIPTextModel(WithProjection) names -> OpenCLIP's original ones (q/k/v joined into
    in_proj, text_projection transposed); checked by running diffusers' convert_open_clip_checkpoint
    back, so the table is the converter's inverse."""
    out = {}
    fixed = {"text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.final_layer_norm.weight": "ln_final.weight",
             "text_model.final_layer_norm.bias": "ln_final.bias"}
    for key, value in state.items():
        m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
        if key in fixed:
            out[prefix + fixed[key]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = np.ascontiguousarray(np.asarray(value).T)
        elif m and m.group(2) in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            if m.group(2) == "self_attn.q_proj":
                base = f"text_model.encoder.layers.{m.group(1)}.self_attn."
                out[f"{prefix}transformer.resblocks.{m.group(1)}.attn.in_proj_{m.group(3)}"] = np.concatenate(
                    [state[f"{base}{p}_proj.{m.group(3)}"] for p in "qkv"])
        elif m and m.group(2) in _OPEN_CLIP_LAYER:
            out[f"{prefix}transformer.resblocks.{m.group(1)}.{_OPEN_CLIP_LAYER[m.group(2)]}.{m.group(3)}"] = value
        else:
            raise WeightsError(f"cannot write {key} in OpenCLIP's layout")
    back, _ = open_clip_to_transformers(_converters("single-file export"), out, {"hidden_size": hidden},
                                        "single-file export", prefix=prefix, projection=True)
    if set(back) != set(state) or any(not np.array_equal(back[k], state[k]) for k in state):
        raise WeightsError("cannot write the OpenCLIP text encoder: diffusers' converter does not read it back")
    return out


def save_single_file(components: Components, path: str, *, ema_unet_params=None, dtype=None) -> str:
    """Write `components` as one original-layout checkpoint (.safetensors, or .ckpt/.pt via torch).

    ema_unet_params: UNet params stored as `model_ema.*` beside the others (the authors' layout).
    The file is written to a temporary name and renamed, so a crash leaves no half file.
    """
    path = os.fspath(path)
    if dtype is not None:
        components = components.astype(dtype)
    state = diffusers_to_ldm(components)
    if ema_unet_params is not None:
        ema = dataclasses.replace(components, unet_params=ema_unet_params)
        ema_state = diffusers_to_ldm(ema.astype(dtype) if dtype is not None else ema)
        state.update({ema_key(k): v for k, v in ema_state.items() if k.startswith(UNET_PREFIX)})
        state["model_ema.decay"] = np.asarray(0.9999, np.float32)
        state["model_ema.num_updates"] = np.asarray(0, np.int32)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        if path.endswith(".safetensors"):
            write_safetensors(state, tmp)
        elif path.endswith((".ckpt", ".pt", ".pth", ".bin")):
            torch = require_torch(path, "to write a .ckpt")
            torch.save({"state_dict": {k: _to_torch(v, torch) for k, v in state.items()}}, tmp)
        else:
            raise WeightsError(f"{path}: unknown single-file type (use .safetensors or .ckpt)")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _to_torch(v: np.ndarray, torch):
    v = np.ascontiguousarray(v)
    if v.dtype == dtypes.numpy_dtype("bf16"):  # torch.from_numpy knows no bf16: move the bits
        return torch.from_numpy(v.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(v)
