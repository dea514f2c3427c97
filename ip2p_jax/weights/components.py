"""`Components`: everything an editing model is made of, as configs + plain numpy param pytrees.

One table (`SPECS`) says, per network, which ip2p_jax.models module builds it, its config class,
the folder and weight-file stem diffusers uses, and how its PyTorch names relate to our params.
"""
from __future__ import annotations

import dataclasses
import functools
from types import ModuleType
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from ip2p_jax import dtypes
from ip2p_jax.models import clip, unet, vae
from ip2p_jax.weights.naming import flax_path_to_torch_key


@dataclasses.dataclass(frozen=True)
class ComponentSpec:
    folder: str          # sub-folder of a diffusers folder
    module: ModuleType   # the ip2p_jax.models module with the Flax model and `abstract_params(config)`
    config_class: type   # its config dataclass (from_dict / to_dict)
    weights_stem: str    # diffusers: diffusion_pytorch_model.safetensors, transformers: model.safetensors
    pickle_stem: str     # diffusers: diffusion_pytorch_model.bin, transformers: pytorch_model.bin
    library: str         # model_index.json entry
    reference_class: str
    # transformers 4 names CLIPTextModel weights `text_model.*`, transformers 5 drops the prefix:
    # files may have it or not; we accept both and write it (both versions read that).
    optional_prefix: str = ""
    abstract_kwargs: tuple = ()   # extra keyword arguments of module.abstract_params, as (name, value) pairs

    def config_from_dict(self, d: Mapping[str, Any], source: str):
        return self.config_class.from_dict(dict(d), source=source)

    def abstract_params(self, config):
        try:
            return _abstract_params_cached(self.module, config, self.abstract_kwargs)
        except TypeError:  # an unhashable config
            return self.module.abstract_params(config, **dict(self.abstract_kwargs))


@functools.lru_cache(maxsize=16)
def _abstract_params_cached(module: ModuleType, config, kwargs: tuple = ()):
    """Tracing a model for its shapes takes seconds; configs are frozen dataclasses, so cache by them."""
    return module.abstract_params(config, **dict(kwargs))


SPECS = {
    "unet": ComponentSpec("unet", unet, unet.UNetConfig, "diffusion_pytorch_model",
                          "diffusion_pytorch_model", "diffusers", "UNet2DConditionModel"),
    "vae": ComponentSpec("vae", vae, vae.VAEConfig, "diffusion_pytorch_model",
                         "diffusion_pytorch_model", "diffusers", "AutoencoderKL"),
    "text_encoder": ComponentSpec("text_encoder", clip, clip.CLIPTextConfig, "model",
                                  "pytorch_model", "transformers", "CLIPTextModel", optional_prefix="text_model."),
}
# SDXL's second text encoder (OpenCLIP ViT-bigG as transformers' CLIPTextModelWithProjection); a
# model has it or not (Components.text2_config is None for Stable Diffusion 1.x / 2.x).
SDXL_SPECS = {
    "text_encoder_2": ComponentSpec("text_encoder_2", clip, clip.CLIPTextConfig, "model", "pytorch_model",
                                    "transformers", "CLIPTextModelWithProjection",
                                    abstract_kwargs=(("projection", True),)),
}
ALL_SPECS = {**SPECS, **SDXL_SPECS}


@dataclasses.dataclass
class Components:
    """A complete Stable Diffusion / InstructPix2Pix model: configs, params, tokenizer, scheduler.

    Params are the plain nested dicts a Flax `apply({'params': p}, ...)` takes, numpy arrays
    on the host (device_put them where needed). The UNet may have 8 input channels
    (InstructPix2Pix) or 4 (Stable Diffusion; see `expand_conv_in`).
    SDXL models also have text2_config / text2_params / tokenizer_2 (the second text encoder) and
    pipeline_config: the model_index.json settings SDXL editing reads (force_zeros_for_empty_prompt,
    is_cosxl_edit).
    """
    unet_config: Any
    unet_params: dict
    vae_config: Any
    vae_params: dict
    text_config: Any
    text_params: dict
    tokenizer: Any
    scheduler_config: dict
    source: str = ""
    notes: list = dataclasses.field(default_factory=list)   # what the loader decided (EMA, variant, ...)
    text2_config: Any = None
    text2_params: dict | None = None
    tokenizer_2: Any = None
    pipeline_config: dict = dataclasses.field(default_factory=dict)

    @property
    def is_sdxl(self) -> bool:
        return self.text2_config is not None

    def configs(self) -> dict:
        out = {"unet": self.unet_config, "vae": self.vae_config, "text_encoder": self.text_config}
        return {**out, "text_encoder_2": self.text2_config} if self.is_sdxl else out

    def params(self) -> dict:
        out = {"unet": self.unet_params, "vae": self.vae_params, "text_encoder": self.text_params}
        return {**out, "text_encoder_2": self.text2_params} if self.is_sdxl else out

    def param_counts(self) -> dict[str, int]:
        return {name: count_params(p) for name, p in self.params().items()}

    def dtypes(self) -> dict[str, str]:
        return {name: describe_dtypes(p) for name, p in self.params().items()}

    def astype(self, dtype) -> "Components":
        d = dtypes.numpy_dtype(dtype)
        cast = lambda p: cast_params(p, d)  # noqa: E731
        text2 = None if self.text2_params is None else cast(self.text2_params)
        return dataclasses.replace(self, unet_params=cast(self.unet_params), vae_params=cast(self.vae_params),
                                   text_params=cast(self.text_params), text2_params=text2, notes=list(self.notes))


def count_params(params) -> int:
    return int(sum(np.prod(np.shape(v)) for v in traverse_util.flatten_dict(dict(params)).values()))


def describe_dtypes(params) -> str:
    names = sorted({str(np.dtype(getattr(v, "dtype", np.float32)))
                    for v in traverse_util.flatten_dict(dict(params)).values()})
    return "/".join(names)


def cast_params(params, dtype) -> dict:
    d = dtypes.numpy_dtype(dtype)
    flat = traverse_util.flatten_dict(dict(params))
    return traverse_util.unflatten_dict({k: np.asarray(v).astype(d, copy=False) for k, v in flat.items()})


def expected_torch_keys(abstract_params) -> list[str]:
    return [flax_path_to_torch_key(p) for p in traverse_util.flatten_dict(dict(abstract_params))]


def align_optional_prefix(state: Mapping[str, Any], spec: ComponentSpec, abstract_params) -> dict:
    """Add or drop `spec.optional_prefix` on every key so the names match what the Flax tree expects."""
    pre = spec.optional_prefix
    if not pre:
        return dict(state)
    want = any(k.startswith(pre) for k in expected_torch_keys(abstract_params))
    out = {}
    for k, v in state.items():
        bare = k[len(pre):] if k.startswith(pre) else k
        out[pre + bare if want else bare] = v
    return out
