"""What a run trains and with what: the Flax modules, the initial trainable params, the frozen parts.

Three initialisations (config.model):
  init = a Stable Diffusion 1.x/2.x model (4-channel UNet; diffusers folder, single file or hub id):
         conv_in widened to 8 channels (extra kernels zero, bias kept) -- the paper's start;
  init = an InstructPix2Pix model (8-channel UNet): continue fine-tuning;
  init = ""  from scratch: the UNet from config.model.unet (a diffusers UNet config dict), random.
The VAE, text encoder, tokenizer and scheduler come from `init`, else from `frozen_from` (a
model folder), else (scratch, small models) the VAE / text encoder are random from
config.model.vae / config.model.text_encoder and the tokenizer is read from config.model.tokenizer.

SDXL: an SDXL source (text_encoder_2 / tokenizer_2 in the folder) or, from scratch, a non-empty
config.model.text_encoder_2 (random CLIPTextModelWithProjection; tokenizer_2 from
config.model.tokenizer_2, default the first tokenizer) gives a text_time UNet both frozen text
encoders; the null conditioning is the empty prompt's {'text', 'pooled'}. config.model.vae_dtype
("" = the compute dtype) runs the frozen VAE in another precision (fp32: the stock SDXL VAE
overflows in fp16).
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Optional

import jax
import numpy as np
from flax import traverse_util

from ip2p_jax import dtypes
from ip2p_jax.errors import Ip2pError
from ip2p_jax.diffusion.schedules import TrainingSchedule
from ip2p_jax.models import clip as clip_lib, unet as unet_lib, vae as vae_lib
from ip2p_jax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from ip2p_jax.placement import sdxl_prompt_function
from ip2p_jax.models.unet import UNet2DConditionModel, UNetConfig
from ip2p_jax.models.vae import AutoencoderKL, VAEConfig
from ip2p_jax.tokenizer import load_tokenizer, tokenize
from ip2p_jax.train.step import Models, StepConfig
from ip2p_jax.weights import Components, expand_conv_in, load

DEFAULT_SCHEDULER = {  # what we write into exported folders when the run had no scheduler config
    "_class_name": "EulerAncestralDiscreteScheduler", "num_train_timesteps": 1000,
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
    "timestep_spacing": "linspace", "steps_offset": 1,
}


class ModelBuildError(Ip2pError):
    """The run's model settings are inconsistent or incomplete."""


@dataclasses.dataclass
class Built:
    models: Models
    step_config: StepConfig
    unet_config: UNetConfig
    vae_config: VAEConfig
    text_config: CLIPTextConfig
    params: dict          # trainable, host: {'unet': ...} (+ 'text_encoder')
    frozen: dict          # {'vae', 'text_encoder' (frozen), 'null_embedding' | 'null_ids', 'alphas_cumprod'}
    tokenizer: Any
    scheduler_config: dict
    notes: list
    text2_config: Optional[CLIPTextConfig] = None   # SDXL's second text encoder (frozen: frozen['text_encoder_2'])
    tokenizer_2: Any = None
    pipeline_config: dict = dataclasses.field(default_factory=dict)   # model_index.json settings (SDXL)

    @property
    def is_sdxl(self) -> bool:
        return self.text2_config is not None


def compute_dtype(name: str, key: str = "model.compute_dtype"):
    """config.model.compute_dtype ('float32' / 'fp32', 'bfloat16' / 'bf16', ...; '' = bf16 on GPU/TPU, fp32 on CPU)."""
    try:
        return dtypes.compute_dtype(name or None)
    except dtypes.DtypeError as e:
        raise ModelBuildError(f"{key}: {e}") from None


def _plain(d) -> dict:
    return d.to_dict() if hasattr(d, "to_dict") else dict(d)


def random_params(abstract: Any, seed: int) -> dict:
    """Host (numpy) init for training from scratch, by leaf kind: kernels LeCun normal (variance
    1/fan_in), embeddings N(0, 0.02^2), norm scales 1, biases 0. Each leaf draws from its own
    stream (seed, path), so nothing is compiled and the result does not depend on the tree's order."""
    flat = traverse_util.flatten_dict(abstract)
    out = {}
    for path, leaf in flat.items():
        shape, name = tuple(leaf.shape), path[-1]
        rng = np.random.default_rng([seed, zlib.crc32("/".join(path).encode())])
        if name == "kernel":
            fan_in = int(np.prod(shape[:-1])) or 1
            value = rng.standard_normal(shape) / np.sqrt(fan_in)
        elif name == "embedding":
            value = 0.02 * rng.standard_normal(shape)
        elif name == "scale":
            value = np.ones(shape)
        elif name == "bias":
            value = np.zeros(shape)
        else:
            value = 0.02 * rng.standard_normal(shape)
        out[path] = value.astype(np.float32)
    return traverse_util.unflatten_dict(out)


def load_components(path: str):
    return load(path, dtype=np.float32, progress=True)


def build(config, *, load_weights: bool = True) -> Built:
    """Resolve config.model / config.train into modules and host params (numpy), see the module doc.

    load_weights=False (export of a scratch run, restore) skips random inits where only configs matter.
    """
    m = config.model
    notes: list[str] = []
    dtype = compute_dtype(m.compute_dtype)

    init = m.init
    src = load_components(init) if init else (load_components(m.frozen_from) if m.frozen_from else None)
    if init:
        unet_config, unet_params = src.unet_config, src.unet_params
        if m.get("init_must_be_editor", False) and unet_config.in_channels != 8:
            raise ModelBuildError(f"{init}: not an InstructPix2Pix editor (its UNet takes {unet_config.in_channels} "
                                  "input channels, an editor 8); model.init_must_be_editor (the finetune preset) "
                                  "continues an editor; start from Stable Diffusion with the sd15 preset")
        if unet_config.in_channels == 4:
            unet_params, unet_config = expand_conv_in(unet_params, unet_config, 8)
            notes.append(f"unet: {init} has 4 input channels; conv_in widened to 8 (extra kernels zero, bias kept)")
        elif unet_config.in_channels == 8:
            notes.append(f"unet: continuing from the InstructPix2Pix UNet in {init}")
        else:
            raise ModelBuildError(f"{init}: UNet has {unet_config.in_channels} input channels (need 4 or 8)")
    else:
        unet_config = UNetConfig.from_dict(_plain(m.unet), source="config.model.unet")
        if unet_config.in_channels != 8:
            raise ModelBuildError(f"config.model.unet.in_channels must be 8, got {unet_config.in_channels}")
        unet_params = None
        notes.append("unet: random init from config.model.unet")

    text2_config = text2_params = tokenizer_2 = None
    pipeline_config: dict = {}
    if src is not None:
        vae_config, vae_params = src.vae_config, src.vae_params
        text_config, text_params = src.text_config, src.text_params
        tokenizer, scheduler_config = src.tokenizer, dict(src.scheduler_config)
        if src.is_sdxl:
            text2_config, text2_params, tokenizer_2 = src.text2_config, src.text2_params, src.tokenizer_2
            pipeline_config = dict(src.pipeline_config)
    else:
        vae_config = VAEConfig.from_dict(_plain(m.vae), source="config.model.vae")
        text_config = CLIPTextConfig.from_dict(_plain(m.text_encoder), source="config.model.text_encoder")
        vae_params = text_params = None
        if not m.tokenizer:
            raise ModelBuildError("training from scratch without model.frozen_from needs model.tokenizer "
                             "(a tokenizer folder, or a model folder with tokenizer/)")
        tokenizer, scheduler_config = load_tokenizer(m.tokenizer), dict(DEFAULT_SCHEDULER)
        # a bare vocab.json + merges.txt folder leaves model_max_length "unlimited"; readers such as
        # diffusers pad to it, so pin it to the text encoder's context length.
        if tokenizer.model_max_length > text_config.max_position_embeddings:
            tokenizer.model_max_length = text_config.max_position_embeddings
        notes.append("vae, text_encoder: random init (config.model.vae / text_encoder)")
        if m.get("text_encoder_2"):
            text2_config = CLIPTextConfig.from_dict(_plain(m.text_encoder_2), source="config.model.text_encoder_2")
            tokenizer_2 = load_tokenizer(m.get("tokenizer_2") or m.tokenizer)
            tokenizer_2.model_max_length = min(tokenizer_2.model_max_length, text2_config.max_position_embeddings)
            notes.append("text_encoder_2: random init (config.model.text_encoder_2)")

    source = init or m.frozen_from or "config.model"
    if unet_config.text_time != (text2_config is not None):
        raise ModelBuildError(f"{source}: the UNet {'expects' if unet_config.text_time else 'does not take'} SDXL's "
                              f"text_time conditioning but the model {'has no' if unet_config.text_time else 'has a'}"
                              f" second text encoder (text_encoder_2)")
    text_dim = text_config.hidden_size + (text2_config.hidden_size if text2_config is not None else 0)

    if unet_config.cross_attention_dim != text_dim:
        raise ModelBuildError(f"{source}: UNet cross_attention_dim={unet_config.cross_attention_dim} != text "
                              f"encoder hidden_size{'s' if text2_config else ''}={text_dim}")
    if text2_config is not None and unet_config.pooled_dim != text2_config.projection_dim:
        raise ModelBuildError(f"{source}: the UNet takes pooled text embeddings of {unet_config.pooled_dim} but "
                              f"text_encoder_2 projects to {text2_config.projection_dim}")
    if text2_config is not None and m.train_text_encoder:
        raise ModelBuildError(f"{source}: model.train_text_encoder is not supported for SDXL models (both text "
                              "encoders stay frozen, as in diffusers' SDXL InstructPix2Pix script)")
    if text2_config is not None and config.data.source == "latent_cache":
        raise ModelBuildError(f"{source}: an SDXL model trains on images (data.source synthetic or tfds); the "
                              "latent cache holds one text encoder's embeddings")
    if unet_config.out_channels != vae_config.latent_channels:
        raise ModelBuildError(f"UNet out_channels={unet_config.out_channels} != VAE latent_channels="
                         f"{vae_config.latent_channels}")

    prediction_type = m.prediction_type or scheduler_config.get("prediction_type") or "epsilon"
    scheduler_config["prediction_type"] = prediction_type
    # DDPM betas only: an EDM model's scheduler (CosXL) or a setting that changes the model's meaning is refused
    schedule = TrainingSchedule.from_config(scheduler_config,
                                            source=f"{init or m.frozen_from or 'model'}: scheduler config")

    vae_dtype = compute_dtype(m.get("vae_dtype", ""), "model.vae_dtype") if m.get("vae_dtype", "") else dtype
    models = Models(
        unet=UNet2DConditionModel(unet_config, dtype=dtype, attention_impl=m.attention_impl, remat=m.remat),
        vae=AutoencoderKL(vae_config, dtype=vae_dtype, attention_impl=m.attention_impl),
        text_encoder=CLIPTextModel(text_config, dtype=dtype, attention_impl=m.attention_impl),
        text_encoder_2=(None if text2_config is None else
                        CLIPTextModelWithProjection(text2_config, dtype=dtype, attention_impl=m.attention_impl)))
    if load_weights:
        if unet_params is None:
            unet_params = random_params(unet_lib.abstract_params(unet_config), config.seed)
        if vae_params is None:
            vae_params = random_params(vae_lib.abstract_params(vae_config), config.seed + 1)
        if text_params is None:
            text_params = random_params(clip_lib.abstract_params(text_config), config.seed + 2)
        if text2_config is not None and text2_params is None:
            text2_params = random_params(clip_lib.abstract_params(text2_config, projection=True), config.seed + 3)

    null_ids = tokenize(tokenizer, [""])
    params = {"unet": unet_params}
    frozen = {"vae": vae_params, "alphas_cumprod": schedule.alphas_cumprod()}
    if m.train_text_encoder:
        params["text_encoder"] = text_params
        frozen["null_ids"] = null_ids
        notes.append("text_encoder: trained")
    elif text2_config is not None:
        frozen["text_encoder"], frozen["text_encoder_2"] = text_params, text2_params
        if load_weights:
            encode = jax.jit(sdxl_prompt_function(models.text_encoder, models.text_encoder_2))
            null = encode({"text": text_params, "text_2": text2_params}, (null_ids, tokenize(tokenizer_2, [""])))
            frozen["null_embedding"] = {k: np.asarray(v, np.float32) for k, v in null.items()}
        # the run trains the encoded "" as the null conditioning; the export's edits use it too
        pipeline_config["force_zeros_for_empty_prompt"] = False
    else:
        frozen["text_encoder"] = text_params
        if load_weights:
            frozen["null_embedding"] = np.asarray(jax.jit(models.text_encoder.apply)({"params": text_params},
                                                                                     null_ids), np.float32)
    t = config.train
    step_config = StepConfig(grad_accum=t.grad_accum, cond_dropout_prob=t.cond_dropout_prob,
                             prediction_type=prediction_type, ema_decay=t.ema_decay,
                             scaling_factor=vae_config.scaling_factor, compute_dtype=dtype)
    return Built(models=models, step_config=step_config, unet_config=unet_config, vae_config=vae_config,
                 text_config=text_config, params=params, frozen=frozen, tokenizer=tokenizer,
                 scheduler_config=scheduler_config, notes=notes, text2_config=text2_config, tokenizer_2=tokenizer_2,
                 pipeline_config=pipeline_config)


def export_components(built: Built, ema_params: dict, frozen_text_params: Optional[dict] = None):
    """A weights.Components of the run: the EMA UNet (and EMA text encoder when trained) + frozen parts."""
    text = ema_params.get("text_encoder", frozen_text_params if frozen_text_params is not None
                          else built.frozen.get("text_encoder"))
    to_np = lambda tree: jax.tree.map(lambda x: np.asarray(x, np.float32), tree)  # noqa: E731
    sdxl = {}
    if built.is_sdxl:
        sdxl = dict(text2_config=built.text2_config, text2_params=to_np(built.frozen["text_encoder_2"]),
                    tokenizer_2=built.tokenizer_2, pipeline_config=dict(built.pipeline_config))
    return Components(unet_config=built.unet_config, unet_params=to_np(ema_params["unet"]),
                      vae_config=built.vae_config, vae_params=to_np(built.frozen["vae"]),
                      text_config=built.text_config, text_params=to_np(text), tokenizer=built.tokenizer,
                      scheduler_config=built.scheduler_config, notes=list(built.notes), **sdxl)
