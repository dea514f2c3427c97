"""The demo model: a small InstructPix2Pix trained from nothing on the synthetic shapes world.

Stages (scripts/train_demo_model.sh runs them all; each resumes where it stopped). The training
stages are presets of the one training loop (ip2p_jax.train.loop: orbax checkpoints, resume,
SIGTERM save): `vae` and `decoder` are configs/autoencoder.py:demo / :decoder, `editor` is
configs/train.py:demo, each filled in from the workdir.

  tokenizer  a CLIP BPE tokenizer of the shapes vocabulary (ip2p_jax.datagen.shapes_tokenizer)
  vae        a small KL autoencoder (f=4, 4 latent channels) on random shapes scenes
             (ip2p_jax.train.autoencoder), trained on 32x32 crops of 64x64 renders; <workdir>/vae
  decoder    (optional, any time) fine-tune the VAE decoder with the encoder frozen: sharper small
             shapes, while every latent already encoded (and the editor trained on them) stays valid
  encode     the TFDS shapes dataset -> <workdir>/latents, a latent cache (ip2p_jax.data.latent_cache):
             VAE posterior moments of both images of each pair and the instruction's token ids
  editor     the 8-channel UNet and the CLIP text encoder, from scratch, jointly, with the
             project's InstructPix2Pix train step (conditioning dropout, EMA) over the latent cache;
             <workdir>/editor (--decay-start S --decay-steps N: a linear cool-down of the rate to 0
             from step S, warmup-stable-decay style; the constant-rate checkpoint at step S is kept
             in editor/checkpoints/S, from which a later run can go on at the constant rate)
  assemble   the EMA weights + VAE + tokenizer + scheduler as a diffusers folder (fp16)
  unpack     (to go on from an assembled model instead of from nothing) its tokenizer, VAE and
             configs into a fresh workdir; then encode, and editor --init-from the model

    python -m ip2p_jax.datagen.demo_model vae --workdir out/demo/run
    python -m ip2p_jax.datagen.demo_model encode --workdir out/demo/run --data-dir out/demo/data/tfds
    python -m ip2p_jax.datagen.demo_model editor --workdir out/demo/run --steps 20000
    python -m ip2p_jax.datagen.demo_model assemble --workdir out/demo/run --out ip2p_jax/demo_model

The editor stage needs the workdir's `model_base.json`, `tokenizer/` and `latents/` (no diffusers
or TFDS), so it also runs on an accelerator machine with jax/flax/optax/orbax/grain.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import os
import shutil
import sys
from typing import Optional

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from PIL import Image

from ip2p_jax.data.latent_cache import read_info
from ip2p_jax.datagen.shapes_tokenizer import build_tokenizer
from ip2p_jax.errors import Ip2pError
from ip2p_jax.models import clip as clip_lib, unet as unet_lib
from ip2p_jax.models.clip import CLIPTextConfig, CLIPTextModel
from ip2p_jax.models.unet import UNet2DConditionModel, UNetConfig
from ip2p_jax.models.vae import AutoencoderKL, VAEConfig, abstract_params as vae_abstract_params
from ip2p_jax.tokenizer import load_tokenizer, tokenize
from ip2p_jax.train.autoencoder import (encode_moments, latent_scaling_factor, read_params, reconstruction_psnr,
                                        write_params)
from ip2p_jax.train.build import DEFAULT_SCHEDULER, build
from ip2p_jax.train.configs import load_config
from ip2p_jax.train.editor import editor_task
from ip2p_jax.train.export import read_ema
from ip2p_jax.train.latent_cache import encode_fn, write_cache
from ip2p_jax.train.loop import show_progress_logs, train
from ip2p_jax.train.scene_crops import random_scene_images
from ip2p_jax.train.state import OptimizerConfig, learning_rate_schedule
from ip2p_jax.weights import Components, load_diffusers_folder, save_diffusers_folder
from ip2p_jax.weights.io import read_json

log = logging.getLogger("ip2p_jax.datagen.demo_model")   # also when run as __main__
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")

RESOLUTION = 64

# diffusers AutoencoderKL config: 64x64 -> 16x16x4. No mid-block attention, so training on
# crops sees the same network as encoding whole images.
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[16, 32, 64], layers_per_block=1,
    down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3, norm_num_groups=8,
    sample_size=RESOLUTION, mid_block_add_attention=False, scaling_factor=0.18215)

# transformers CLIPTextConfig (vocab_size / token ids filled in from the tokenizer).
TEXT_CONFIG = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                   max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=64)

# diffusers UNet2DConditionModel config: 8 input channels (noisy + image latents), 16x16 latents,
# cross-attention at 16x16, 8x8 and 4x4 (and the mid block), 2 heads (diffusers' attention_head_dim
# is the head count here). Attention at 16x16 lets an instruction pick out a small shape.
UNET_CONFIG = dict(
    sample_size=RESOLUTION // 4, in_channels=8, out_channels=4, layers_per_block=1,
    block_out_channels=[32, 64, 64], norm_num_groups=8, cross_attention_dim=64, attention_head_dim=2,
    down_block_types=["CrossAttnDownBlock2D"] * 3, up_block_types=["CrossAttnUpBlock2D"] * 3)

SCHEDULER_CONFIG = dict(DEFAULT_SCHEDULER)   # Euler ancestral, SD's scaled-linear betas

BASE_FILE = "model_base.json"     # configs of the run (written by the vae stage, completed by encode)
VAE_DIR, DECODER_DIR = "vae", "vae_decoder"   # the autoencoder runs (loop workdirs)
VAE_PARAMS = "vae_params.msgpack"             # the workdir's VAE (exported by vae / decoder, read by the rest)
LATENTS_DIR = "latents"                       # the encoded pairs (a latent cache)
EDITOR_DIR = "editor"                         # the editor run (loop workdir: config.json, checkpoints/)


class DemoModelError(Ip2pError):
    """A stage that cannot run (a stage not run yet, a workdir that does not fit)."""


def preset(spec: str):
    """configs/<file>:<preset> of this checkout."""
    file, _, arg = spec.partition(":")
    return load_config(os.path.join(CONFIGS_DIR, file) + ":" + arg)

# ----------------------------------------------------------------------------- stage: tokenizer


def tokenizer_dir(workdir: str) -> str:
    return os.path.join(workdir, "tokenizer")


def make_tokenizer(workdir: str):
    folder = tokenizer_dir(workdir)
    if not os.path.isfile(os.path.join(folder, "vocab.json")):
        build_tokenizer(folder)
    return load_tokenizer(folder)


def text_config_for(tokenizer) -> dict:
    return dict(TEXT_CONFIG, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


# ----------------------------------------------------------------------------- stage: vae


def vae_params_path(workdir: str) -> str:
    return os.path.join(workdir, VAE_PARAMS)


def _held_out(seed: int) -> np.ndarray:
    return random_scene_images(np.random.default_rng([seed, 0x7E57]), 64).astype(np.float32) / 127.5 - 1


def _autoencoder_config(name: str, workdir: str, vae_dict: dict, steps: int, batch_size: int, learning_rate: float,
                        seed: int, crop: int, progress: bool):
    c = preset(f"autoencoder.py:{name}")
    c.model.vae = dict(vae_dict)
    c.seed = seed
    c.optim.learning_rate = learning_rate
    c.train.num_steps, c.train.batch_size = steps, batch_size
    c.data.crop = crop
    c.checkpoint.every_steps = min(200, steps)
    c.log.progress_bar = progress
    c.export.dir = workdir
    return c


def train_vae(workdir: str, steps: int, batch_size: int = 32, learning_rate: float = 1e-3,
              kl_weight: float = 1e-5, seed: int = 0, progress: bool = True, crop: int = 32,
              configs: Optional[dict] = None) -> dict:
    """Train the VAE (configs/autoencoder.py:demo in <workdir>/vae, resumable), measure its PSNR and latent
    scale, write <workdir>/vae_params.msgpack and the base config.

    configs: optional replacements for the "vae" / "unet" / "text_encoder" config dicts (tests)."""
    os.makedirs(workdir, exist_ok=True)
    tokenizer = make_tokenizer(workdir)
    configs = dict(configs or {})
    vae_dict = configs.get("vae", VAE_CONFIG)
    cfg = VAEConfig.from_dict(vae_dict, source="demo VAE config")
    c = _autoencoder_config("demo", workdir, vae_dict, steps, batch_size, learning_rate, seed, crop, progress)
    c.loss.kl_weight = kl_weight
    params = jax.device_get(train(c, os.path.join(workdir, VAE_DIR), return_state=True).state.params)
    held_out = _held_out(seed)
    psnr = reconstruction_psnr(cfg, params, held_out)
    scaling = latent_scaling_factor(encode_moments(cfg, params, held_out))
    base = {"vae": dict(vae_dict, scaling_factor=round(scaling, 5)),
            "text_encoder": dict(text_config_for(tokenizer), **configs.get("text_encoder", {})),
            "unet": configs.get("unet", UNET_CONFIG), "scheduler": SCHEDULER_CONFIG,
            "vae_metrics": {"steps": steps, "psnr_db": round(psnr, 2), "scaling_factor": scaling}}
    _write_json(os.path.join(workdir, BASE_FILE), base)
    log.info("vae: %d steps, reconstruction PSNR %.2f dB on 64 held-out scenes, latent scaling factor %.4f",
             steps, psnr, scaling)
    return base


def refine_decoder(workdir: str, steps: int, batch_size: int = 32, learning_rate: float = 5e-4,
                   seed: int = 1, progress: bool = True, crop: int = 32, decay_steps: int = 0) -> dict:
    """Fine-tune the decoder of the workdir's VAE (configs/autoencoder.py:decoder in <workdir>/vae_decoder,
    resumable) with the encoder frozen, then replace the VAE params and record the PSNR before and after."""
    base = read_base(workdir)
    cfg = VAEConfig.from_dict(base["vae"], source="demo VAE config")
    metrics = dict(base.get("vae_metrics", {}))
    held_out = _held_out(seed)
    psnr_before = metrics.get("psnr_db_before_decoder") or reconstruction_psnr(cfg, load_vae_params(workdir),
                                                                               held_out)
    c = _autoencoder_config("decoder", workdir, base["vae"], steps, batch_size, learning_rate, seed, crop, progress)
    c.model.init_params = vae_params_path(workdir)
    c.optim.decay_steps = decay_steps
    c.optim.decay_start = max(steps - decay_steps, c.optim.warmup_steps)   # the last decay_steps steps
    params = jax.device_get(train(c, os.path.join(workdir, DECODER_DIR), return_state=True).state.params)
    psnr = reconstruction_psnr(cfg, params, held_out)
    metrics.update(decoder_steps=steps, psnr_db_before_decoder=round(psnr_before, 2), psnr_db=round(psnr, 2))
    base["vae_metrics"] = metrics
    _write_json(os.path.join(workdir, BASE_FILE), base)
    log.info("decoder: %d steps (encoder frozen), reconstruction PSNR %.2f -> %.2f dB on 64 held-out scenes",
             steps, psnr_before, psnr)
    return base


def load_vae_params(workdir: str) -> dict:
    cfg = VAEConfig.from_dict(read_base(workdir)["vae"], source="demo VAE config")
    return read_params(vae_params_path(workdir), jax.tree.map(lambda s: np.zeros(s.shape, np.float32),
                                                              vae_abstract_params(cfg)))


def unpack(model: str, workdir: str, recipe_unet: bool = False) -> dict:
    """An assembled demo model -> a workdir with its tokenizer, VAE and configs (instead of the vae
    stage), so that the editor can go on training from its weights: encode, then editor --init-from.
    ``recipe_unet``: this recipe's UNet config (UNET_CONFIG) instead of the model's, e.g. to grow
    cross-attention into an older model's UNet (see warm_start_params)."""
    if os.path.exists(os.path.join(workdir, BASE_FILE)):
        raise DemoModelError(f"{workdir}: already holds a run ({BASE_FILE}); unpack into a fresh workdir")
    comps = load_diffusers_folder(model, dtype=np.float32)
    os.makedirs(workdir, exist_ok=True)
    shutil.copytree(os.path.join(model, "tokenizer"), tokenizer_dir(workdir))
    write_params(comps.vae_params, workdir)
    # the config dicts as the vae stage writes them: without the reference library's class tags
    plain = lambda cfg: {k: v for k, v in cfg.to_dict().items()   # noqa: E731
                         if not k.startswith("_") and k != "model_type"}
    info_path = os.path.join(model, "training.json")
    info = read_json(info_path) if os.path.isfile(info_path) else {}
    base = {"vae": plain(comps.vae_config), "text_encoder": plain(comps.text_config),
            "unet": dict(UNET_CONFIG) if recipe_unet else plain(comps.unet_config),
            "scheduler": dict(comps.scheduler_config),
            "vae_metrics": info.get("vae", {}),
            "warm_start": {"model": model, "editor_steps": info.get("editor_steps")}}
    _write_json(os.path.join(workdir, BASE_FILE), base)
    log.info("unpack: %s -> %s (tokenizer, VAE, configs)", model, workdir)
    return base


# ----------------------------------------------------------------------------- stage: encode


def latents_dir(workdir: str) -> str:
    return os.path.join(workdir, LATENTS_DIR)


def _decode_image(data) -> np.ndarray:
    if isinstance(data, np.ndarray) and data.ndim == 3:
        return data
    return np.asarray(Image.open(io.BytesIO(bytes(data))).convert("RGB"))


def _pair_batches(source, n: int, batch_size: int, tokenizer, where: str):
    for start in range(0, n, batch_size):
        recs = [source[i] for i in range(start, min(start + batch_size, n))]
        batch = {}
        for key in ("input_image", "edited_image"):
            imgs = np.stack([_decode_image(r[key]) for r in recs]).astype(np.float32) / 127.5 - 1.0
            if imgs.shape[1:3] != (RESOLUTION, RESOLUTION):
                raise DemoModelError(f"{where}: {key} is {imgs.shape[1:3]}, the demo model needs "
                                     f"{RESOLUTION}x{RESOLUTION} pairs (shapes_pairs.py --resolution {RESOLUTION})")
            batch[key] = imgs
        batch["input_ids"] = tokenize(tokenizer, [r["instruction"].decode() if isinstance(r["instruction"], bytes)
                                                  else str(r["instruction"]) for r in recs])
        yield batch


def encode_pairs(workdir: str, data_dir: str, name: str = "shapes", split: str = "train",
                 max_examples: Optional[int] = None, batch_size: int = 256, progress: bool = True) -> dict:
    """TFDS edit pairs -> <workdir>/latents, a latent cache (replaced if there): input_moments, edited_moments
    (16, 16, 8) fp32 (concat of posterior mean and logvar) and input_ids (77,) int32 per pair.
    Returns {key: (N, ...) shape}."""
    from ip2p_jax.data.builder import encoded_source, open_dataset  # optional heavy dependency (TFDS)

    base = read_base(workdir)
    cfg = VAEConfig.from_dict(base["vae"], source="demo VAE config")
    params = load_vae_params(workdir)
    tokenizer = make_tokenizer(workdir)
    source = encoded_source(open_dataset(data_dir, name), split)
    n = len(source) if max_examples is None else min(max_examples, len(source))
    out = latents_dir(workdir)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out + ".tmp", ignore_errors=True)
    info = write_cache(out, _pair_batches(source, n, batch_size, tokenizer, f"{data_dir}/{name}"),
                       encode_fn(AutoencoderKL(cfg)), params, source=f"tfds:{data_dir}/{name}:{split}",
                       max_examples=n, progress=progress)
    log.info("encode: %d pairs of %s/%s:%s -> %s", n, data_dir, name, split, out)
    return {k: (info["num_examples"], *shape) for k, shape in info["shapes"].items()}


# ----------------------------------------------------------------------------- stage: editor


@dataclasses.dataclass(frozen=True)
class EditorTrainConfig:
    steps: int = 20000
    batch_size: int = 64
    learning_rate: float = 8e-4
    warmup_steps: int = 200
    decay_start: int = 0          # with decay_steps > 0: linear cool-down of the rate to 0 from here
    decay_steps: int = 0
    weight_decay: float = 1e-2
    ema_decay: float = 0.999
    cond_dropout_prob: float = 0.05
    seed: int = 0
    init_from: str = ""           # an assembled demo model folder: start from its weights (see unpack)
    checkpoint_every: int = 250
    log_every: int = 50


def editor_config(workdir: str, cfg: EditorTrainConfig, latents: Optional[str] = None, progress: bool = False):
    """configs/train.py:demo filled in from the workdir (its model configs, tokenizer, latent cache) and cfg."""
    c = preset("train.py:demo")
    c.optim.learning_rate, c.optim.warmup_steps = cfg.learning_rate, cfg.warmup_steps
    c.optim.decay_start, c.optim.decay_steps = cfg.decay_start, cfg.decay_steps
    c.optim.weight_decay = cfg.weight_decay
    learning_rate_schedule(OptimizerConfig.from_mapping(c.optim))   # a bad schedule fails before anything loads
    base = read_base(workdir)
    c.seed = cfg.seed
    c.model.unet, c.model.vae, c.model.text_encoder = base["unet"], base["vae"], base["text_encoder"]
    c.model.tokenizer = tokenizer_dir(workdir)
    c.train.batch_size, c.train.num_steps = cfg.batch_size, cfg.steps
    c.train.ema_decay, c.train.cond_dropout_prob = cfg.ema_decay, cfg.cond_dropout_prob
    c.data.path = latents or latents_dir(workdir)
    c.checkpoint.every_steps = cfg.checkpoint_every
    # the cool-down is a branch: keep the constant-rate state at its start so a later run can go on from it
    c.checkpoint.keep_steps = (cfg.decay_start,) if cfg.decay_steps > 0 else ()
    c.log.every_steps = cfg.log_every
    c.log.progress_bar = progress
    return c


def train_editor(workdir: str, cfg: EditorTrainConfig, latents: Optional[str] = None, progress: bool = True):
    """Train UNet + text encoder jointly (configs/train.py:demo in <workdir>/editor, resumable); returns the
    final train state (host)."""
    c = editor_config(workdir, cfg, latents, progress)
    read_info(c.data.path)   # a missing cache is a message, not a traceback from the loop
    built = build(c)
    task = editor_task(c, built)
    if cfg.init_from:   # a fresh run starts from the model's weights; a resumed one goes on from its own state
        task.init_params = lambda: warm_start_params(cfg.init_from, built.params)
    return train(c, os.path.join(workdir, EDITOR_DIR), task, return_state=True).state


def editor_models(base: dict):
    unet_cfg = UNetConfig.from_dict(base["unet"], source="demo UNet config")
    text_cfg = CLIPTextConfig.from_dict(base["text_encoder"], source="demo text encoder config")
    return unet_cfg, text_cfg, UNet2DConditionModel(unet_cfg), CLIPTextModel(text_cfg)


def warm_start_params(model: str, fresh: dict) -> dict:
    """The UNet and text encoder weights of an assembled demo model, checked against the fresh init.

    The workdir's UNet may grow the model's: a cross-attention block (``attentions_<j>``) that the
    model lacks keeps its fresh weights with a zero ``proj_out``, so it starts as the identity and
    the grown network computes exactly what the model did. Anything else must match."""
    comps = load_diffusers_folder(model, dtype=np.float32)
    have = flatten_dict({"unet": comps.unet_params, "text_encoder": comps.text_params})
    want = flatten_dict(fresh)
    have_prefixes = {h[:i] for h in have for i in range(1, len(h) + 1)}
    new_blocks = {k[:i + 1] for k in set(want) - set(have) for i, name in enumerate(k)
                  if name.startswith("attentions_") and k[:i + 1] not in have_prefixes}
    grown = {k for k in want if any(k[:len(b)] == b for b in new_blocks)}
    bad = sorted("/".join(k) for k in (set(have) ^ set(want)) - grown)
    bad += sorted("/".join(k) for k in set(have) & set(want) if have[k].shape != tuple(want[k].shape))
    if bad:
        raise DemoModelError(f"{model}: its UNet / text encoder do not match this workdir's configs ({bad[0]}, "
                         f"{len(bad)} in all; unpack it into a fresh workdir: demo_model unpack --model {model})")
    params = dict(have)
    for k in grown:
        params[k] = np.zeros(want[k].shape, np.float32) if "proj_out" in k else np.asarray(jax.device_get(want[k]))
    if grown:
        log.info("editor: %d cross-attention blocks added to the model's UNet (zero proj_out: they start as "
                 "identities)", len(new_blocks))
    log.info("editor: starting from the weights of %s", model)
    return unflatten_dict(params)


def read_editor_ema(workdir: str) -> tuple[dict, int]:
    """(The EMA params {'unet', 'text_encoder'} of the editor run's latest checkpoint (numpy), its step)."""
    run = os.path.join(workdir, EDITOR_DIR)
    if not os.path.isdir(os.path.join(run, "checkpoints")):
        raise DemoModelError(f"{run}/checkpoints: missing; run the editor stage first")
    unet_cfg, text_cfg, _, _ = editor_models(read_base(workdir))
    abstract = {"unet": unet_lib.abstract_params(unet_cfg), "text_encoder": clip_lib.abstract_params(text_cfg)}
    return read_ema(run, abstract)


# ----------------------------------------------------------------------------- stage: assemble


def assemble(workdir: str, out: str, dtype: str = "fp16") -> str:
    """Write the EMA editor + VAE + tokenizer + scheduler as a diffusers folder."""
    base = read_base(workdir)
    unet_cfg, text_cfg, _, _ = editor_models(base)
    ema, step = read_editor_ema(workdir)
    comps = Components(unet_config=unet_cfg, unet_params=ema["unet"],
                       vae_config=VAEConfig.from_dict(base["vae"], source="demo VAE config"),
                       vae_params=load_vae_params(workdir), text_config=text_cfg, text_params=ema["text_encoder"],
                       tokenizer=make_tokenizer(workdir), scheduler_config=dict(base["scheduler"]))
    path = save_diffusers_folder(comps, out, dtype=dtype, overwrite=True)
    for name in ("vocab.json", "merges.txt"):   # also the older hub layout (transformers 4 reads it)
        shutil.copyfile(os.path.join(tokenizer_dir(workdir), name), os.path.join(path, "tokenizer", name))
    info = {"editor_steps": step, "vae": base.get("vae_metrics", {}), "trained_by": "scripts/train_demo_model.sh"}
    if "warm_start" in base:   # the editor went on from an earlier model's weights
        info["warm_start"] = base["warm_start"]
    _write_json(os.path.join(path, "training.json"), info)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    log.info("assemble: editor step %d -> %s (%.1f MB)", step, path, size / 1e6)
    return path


# ----------------------------------------------------------------------------- helpers


def _write_json(path: str, d: dict) -> None:
    _write_bytes(path, json.dumps(d, indent=2).encode())


def _write_bytes(path: str, data: bytes) -> None:
    """Atomically: a crash leaves the previous file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def read_base(workdir: str) -> dict:
    path = os.path.join(workdir, BASE_FILE)
    if not os.path.isfile(path):
        raise DemoModelError(f"{path}: missing; run the vae stage first")
    with open(path) as f:
        return json.load(f)


# ----------------------------------------------------------------------------- command line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ip2p_jax.datagen.demo_model", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="stage", required=True)
    v = sub.add_parser("vae", help="train the autoencoder (and write the tokenizer)")
    v.add_argument("--workdir", required=True)
    v.add_argument("--steps", type=int, default=800)
    v.add_argument("--batch-size", type=int, default=32)
    v.add_argument("--seed", type=int, default=0)
    d = sub.add_parser("decoder", help="fine-tune the VAE decoder with the encoder frozen (latents stay valid)")
    d.add_argument("--workdir", required=True)
    d.add_argument("--steps", type=int, default=5000)
    d.add_argument("--batch-size", type=int, default=32)
    d.add_argument("--learning-rate", type=float, default=5e-4)
    d.add_argument("--seed", type=int, default=1)
    d.add_argument("--decay-steps", type=int, default=2000, help="linear cool-down of the rate over the last N steps")
    u = sub.add_parser("unpack", help="a demo model's tokenizer, VAE and configs into a fresh workdir "
                                      "(instead of vae), to go on training its editor (editor --init-from)")
    u.add_argument("--model", required=True)
    u.add_argument("--workdir", required=True)
    u.add_argument("--recipe-unet", action="store_true",
                   help="train this recipe's UNet config, not the model's: cross-attention blocks the model "
                        "lacks are added as identities (zero proj_out) and learnt")
    e = sub.add_parser("encode", help="encode the TFDS pairs with the VAE into <workdir>/latents (a latent cache)")
    e.add_argument("--workdir", required=True)
    e.add_argument("--data-dir", required=True, help="TFDS data dir (scripts/build_tfds.py --data-dir)")
    e.add_argument("--name", default="shapes")
    e.add_argument("--max-examples", type=int, default=None)
    t = sub.add_parser("editor", help="train the UNet + text encoder on <workdir>/latents")
    t.add_argument("--workdir", required=True)
    t.add_argument("--latents", default=None, help="a latent cache with token ids (default: <workdir>/latents)")
    for f in dataclasses.fields(EditorTrainConfig):
        t.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    a = sub.add_parser("assemble", help="write the diffusers folder")
    a.add_argument("--workdir", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--dtype", default="fp16", choices=["fp16", "fp32"])
    args = p.parse_args(argv)
    show_progress_logs()   # run as a script: the stages' progress lines on stderr
    try:
        if args.stage == "vae":
            train_vae(args.workdir, args.steps, args.batch_size, seed=args.seed, progress=False)
        elif args.stage == "decoder":
            refine_decoder(args.workdir, args.steps, args.batch_size, args.learning_rate, args.seed, progress=False,
                           decay_steps=args.decay_steps)
        elif args.stage == "unpack":
            unpack(args.model, args.workdir, args.recipe_unet)
        elif args.stage == "encode":
            encode_pairs(args.workdir, args.data_dir, args.name, max_examples=args.max_examples, progress=False)
        elif args.stage == "editor":
            cfg = EditorTrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EditorTrainConfig)})
            train_editor(args.workdir, cfg, args.latents, progress=False)
        elif args.stage == "assemble":
            assemble(args.workdir, args.out, args.dtype)
    except Ip2pError as e:   # bad settings, a stage not run yet
        print(f"demo_model {args.stage}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
