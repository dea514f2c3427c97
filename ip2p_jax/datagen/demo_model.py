"""The demo model: a small InstructPix2Pix trained from nothing on the synthetic shapes world.

Stages (scripts/train_demo_model.sh runs them all; each resumes where it stopped):

  tokenizer  a CLIP BPE tokenizer of the shapes vocabulary (ip2p_jax.datagen.shapes_tokenizer)
  vae        a small KL autoencoder (f=4, 4 latent channels) on random shapes scenes
             (ip2p_jax.train.autoencoder), trained on 32x32 crops of 64x64 renders
  decoder    (optional, any time) fine-tune the VAE decoder with the encoder frozen: sharper small
             shapes, while every latent already encoded (and the editor trained on them) stays valid
  encode     the TFDS shapes dataset -> one .npz: VAE posterior moments of both images of each
             pair (and of the h-flipped pair) and the instruction's token ids
  editor     the 8-channel UNet and the CLIP text encoder, from scratch, jointly, with the
             project's InstructPix2Pix train step (ip2p_jax.train.step: conditioning dropout,
             EMA) over the encoded pairs
             (--decay-start S --decay-steps N: a linear cool-down of the rate to 0 from step S,
             warmup-stable-decay style; the constant-rate state at S is kept as
             editor_state_stable.msgpack, from which a later run can go on at the constant rate)
  assemble   the EMA weights + VAE + tokenizer + scheduler as a diffusers folder (fp16)
  unpack     (to go on from an assembled model instead of from nothing) its tokenizer, VAE and
             configs into a fresh workdir; then encode, and editor --init-from the model

    python -m ip2p_jax.datagen.demo_model vae --workdir out/demo/run
    python -m ip2p_jax.datagen.demo_model encode --workdir out/demo/run --data-dir out/demo/data/tfds
    python -m ip2p_jax.datagen.demo_model editor --workdir out/demo/run --steps 20000
    python -m ip2p_jax.datagen.demo_model assemble --workdir out/demo/run --out ip2p_jax/demo_model

The editor stage only needs jax/flax/optax and the .npz, so it also runs on an accelerator
machine without diffusers/TFDS (copy `<workdir>/pairs.npz` and `<workdir>/model_base.json`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from typing import Iterator, Optional

import numpy as np

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

SCHEDULER_CONFIG = {
    "_class_name": "EulerAncestralDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
    "timestep_spacing": "linspace", "steps_offset": 1}

BASE_FILE = "model_base.json"     # configs of the run (written by the vae stage, completed by encode)
PAIRS_FILE = "pairs.npz"
EDITOR_STATE = "editor_state.msgpack"
EDITOR_STATE_STABLE = "editor_state_stable.msgpack"   # the state where a cool-down began


# ----------------------------------------------------------------------------- stage: tokenizer


def tokenizer_dir(workdir: str) -> str:
    return os.path.join(workdir, "tokenizer")


def make_tokenizer(workdir: str):
    from ip2p_jax.tokenizer import load_tokenizer
    from ip2p_jax.datagen.shapes_tokenizer import build_tokenizer

    folder = tokenizer_dir(workdir)
    if not os.path.isfile(os.path.join(folder, "vocab.json")):
        build_tokenizer(folder)
    return load_tokenizer(folder)


def text_config_for(tokenizer) -> dict:
    return dict(TEXT_CONFIG, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


# ----------------------------------------------------------------------------- stage: vae


def random_scene_images(rng: np.random.Generator, n: int, resolution: int = RESOLUTION) -> np.ndarray:
    """uint8 (n, res, res, 3) renders of random placed scenes of the shapes world."""
    from ip2p_jax.datagen.shapes.render import render_array
    from ip2p_jax.datagen.shapes.world import Layout, sample_scene

    out = np.empty((n, resolution, resolution, 3), np.uint8)
    for i in range(n):
        scene = Layout.from_seed(int(rng.integers(2 ** 31))).place(sample_scene(rng))
        out[i] = render_array(scene, resolution)
    return out


def vae_batches(seed: int, batch_size: int, crop: int = 32, pool: int = 1024,
                refresh: int = 64) -> Iterator[np.ndarray]:
    """Endless float32 batches in [-1, 1] of random crops (offsets on the 4-pixel latent grid, so
    crops are encoded in the same phase as whole images) of a pool of renders that is partly
    re-rendered as it goes; random h-flips."""
    rng = np.random.default_rng([seed, 0xAE])
    images = random_scene_images(rng, pool)
    while True:
        images[rng.integers(pool, size=min(refresh, pool))] = random_scene_images(rng, min(refresh, pool))
        for _ in range(pool // batch_size):
            idx = rng.integers(pool, size=batch_size)
            ys = rng.integers(0, (RESOLUTION - crop) // 4 + 1, size=batch_size) * 4
            xs = rng.integers(0, (RESOLUTION - crop) // 4 + 1, size=batch_size) * 4
            b = np.stack([images[i, y:y + crop, x:x + crop] for i, y, x in zip(idx, ys, xs)])
            b = b.astype(np.float32) / 127.5 - 1.0
            flip = rng.random(batch_size) < 0.5
            b[flip] = b[flip, :, ::-1]
            yield b


def vae_params_path(workdir: str) -> str:
    return os.path.join(workdir, "vae_params.msgpack")


def train_vae(workdir: str, steps: int, batch_size: int = 32, learning_rate: float = 1e-3,
              kl_weight: float = 1e-5, seed: int = 0, progress: bool = True, crop: int = 32,
              configs: Optional[dict] = None) -> dict:
    """Train the VAE (resumable), measure its PSNR and latent scale, write the base config.

    configs: optional replacements for the "vae" / "unet" / "text_encoder" config dicts (tests)."""
    import flax
    from ip2p_jax.models.vae import VAEConfig
    from ip2p_jax.train.autoencoder import (AutoencoderTrainConfig, encode_moments, latent_scaling_factor,
                                            reconstruction_psnr, train_autoencoder)

    os.makedirs(workdir, exist_ok=True)
    tokenizer = make_tokenizer(workdir)
    configs = dict(configs or {})
    vae_dict = configs.get("vae", VAE_CONFIG)
    cfg = VAEConfig.from_dict(vae_dict, source="demo VAE config")
    tcfg = AutoencoderTrainConfig(steps=steps, learning_rate=learning_rate, kl_weight=kl_weight, seed=seed,
                                  checkpoint_every=min(200, steps))
    params = train_autoencoder(cfg, vae_batches(seed, batch_size, crop, pool=max(64, 16 * batch_size)), tcfg,
                               workdir=os.path.join(workdir, "vae"), progress=progress)
    held_out = random_scene_images(np.random.default_rng([seed, 0x7E57]), 64).astype(np.float32) / 127.5 - 1
    psnr = reconstruction_psnr(cfg, params, held_out)
    scaling = latent_scaling_factor(encode_moments(cfg, params, held_out))
    _write_bytes(vae_params_path(workdir), flax.serialization.to_bytes(params))
    base = {"vae": dict(vae_dict, scaling_factor=round(scaling, 5)),
            "text_encoder": dict(text_config_for(tokenizer), **configs.get("text_encoder", {})),
            "unet": configs.get("unet", UNET_CONFIG), "scheduler": SCHEDULER_CONFIG,
            "vae_metrics": {"steps": steps, "psnr_db": round(psnr, 2), "scaling_factor": scaling}}
    _write_json(os.path.join(workdir, BASE_FILE), base)
    print(f"vae: {steps} steps, reconstruction PSNR {psnr:.2f} dB on 64 held-out scenes, "
          f"latent scaling factor {scaling:.4f}", flush=True)
    return base


def refine_decoder(workdir: str, steps: int, batch_size: int = 32, learning_rate: float = 5e-4,
                   seed: int = 1, progress: bool = True, crop: int = 32, decay_steps: int = 0) -> dict:
    """Fine-tune the decoder of the workdir's VAE (state in <workdir>/vae_decoder, resumable) with
    the encoder frozen, then replace the VAE params and record the PSNR before and after."""
    import flax
    from ip2p_jax.models.vae import VAEConfig
    from ip2p_jax.train.autoencoder import AutoencoderTrainConfig, reconstruction_psnr, train_autoencoder

    base = read_base(workdir)
    cfg = VAEConfig.from_dict(base["vae"], source="demo VAE config")
    before = load_vae_params(workdir)
    metrics = dict(base.get("vae_metrics", {}))
    held_out = random_scene_images(np.random.default_rng([seed, 0x7E57]), 64).astype(np.float32) / 127.5 - 1
    psnr_before = metrics.get("psnr_db_before_decoder") or reconstruction_psnr(cfg, before, held_out)
    tcfg = AutoencoderTrainConfig(steps=steps, learning_rate=learning_rate, decoder_only=True, seed=seed,
                                  decay_steps=decay_steps, checkpoint_every=min(200, steps))
    params = train_autoencoder(cfg, vae_batches(seed, batch_size, crop, pool=max(64, 16 * batch_size)), tcfg,
                               workdir=os.path.join(workdir, "vae_decoder"), progress=progress, init_params=before)
    psnr = reconstruction_psnr(cfg, params, held_out)
    _write_bytes(vae_params_path(workdir), flax.serialization.to_bytes(params))
    metrics.update(decoder_steps=steps, psnr_db_before_decoder=round(psnr_before, 2), psnr_db=round(psnr, 2))
    base["vae_metrics"] = metrics
    _write_json(os.path.join(workdir, BASE_FILE), base)
    print(f"decoder: {steps} steps (encoder frozen), reconstruction PSNR {psnr_before:.2f} -> {psnr:.2f} dB "
          f"on 64 held-out scenes", flush=True)
    return base


def load_vae_params(workdir: str) -> dict:
    import flax
    import jax
    from ip2p_jax.models.vae import VAEConfig, abstract_params

    cfg = VAEConfig.from_dict(read_base(workdir)["vae"], source="demo VAE config")
    template = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), abstract_params(cfg))
    with open(vae_params_path(workdir), "rb") as f:
        return flax.serialization.from_bytes(template, f.read())


def unpack(model: str, workdir: str, recipe_unet: bool = False) -> dict:
    """An assembled demo model -> a workdir with its tokenizer, VAE and configs (instead of the vae
    stage), so that the editor can go on training from its weights: encode, then editor --init-from.
    ``recipe_unet``: this recipe's UNet config (UNET_CONFIG) instead of the model's, e.g. to grow
    cross-attention into an older model's UNet (see warm_start_params)."""
    import flax

    from ip2p_jax.weights import load_diffusers_folder
    from ip2p_jax.weights.io import read_json

    if os.path.exists(os.path.join(workdir, BASE_FILE)):
        raise ValueError(f"{workdir}: already holds a run ({BASE_FILE}); unpack into a fresh workdir")
    comps = load_diffusers_folder(model, dtype=np.float32)
    os.makedirs(workdir, exist_ok=True)
    shutil.copytree(os.path.join(model, "tokenizer"), tokenizer_dir(workdir))
    _write_bytes(vae_params_path(workdir), flax.serialization.to_bytes(comps.vae_params))
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
    print(f"unpack: {model} -> {workdir} (tokenizer, VAE, configs)", flush=True)
    return base


# ----------------------------------------------------------------------------- stage: encode


def _decode_image(data) -> np.ndarray:
    import io

    from PIL import Image

    if isinstance(data, np.ndarray) and data.ndim == 3:
        return data
    return np.asarray(Image.open(io.BytesIO(bytes(data))).convert("RGB"))


def encode_pairs(workdir: str, data_dir: str, name: str = "shapes", split: str = "train",
                 max_examples: Optional[int] = None, batch_size: int = 256, progress: bool = True) -> dict:
    """TFDS edit pairs -> <workdir>/pairs.npz: input_moments, edited_moments (N, 16, 16, 8) fp16
    (concat of posterior mean and logvar), input_ids (N, 77) int32, instruction (N,) str."""
    import jax
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    from ip2p_jax.data.builder import encoded_source, open_dataset
    from ip2p_jax.tokenizer import tokenize
    from ip2p_jax.models.vae import AutoencoderKL, VAEConfig

    base = read_base(workdir)
    cfg = VAEConfig.from_dict(base["vae"], source="demo VAE config")
    params = load_vae_params(workdir)
    tokenizer = make_tokenizer(workdir)
    builder = open_dataset(data_dir, name)
    source = encoded_source(builder, split)
    n = len(source) if max_examples is None else min(max_examples, len(source))
    model = AutoencoderKL(cfg)
    encode = jax.jit(lambda p, x: jnp.concatenate(model.apply({"params": p}, x, method=model.encode), axis=-1))
    out = {"input_moments": [], "edited_moments": [], "instruction": []}
    bar = tqdm(total=n, desc="encoding pairs", unit="pair", disable=not progress)
    for start in range(0, n, batch_size):
        recs = [source[i] for i in range(start, min(start + batch_size, n))]
        for key in ("input_image", "edited_image"):
            imgs = np.stack([_decode_image(r[key]) for r in recs]).astype(np.float32) / 127.5 - 1.0
            if imgs.shape[1:3] != (RESOLUTION, RESOLUTION):
                raise ValueError(f"{data_dir}/{name}: {key} is {imgs.shape[1:3]}, the demo model needs "
                                 f"{RESOLUTION}x{RESOLUTION} pairs (shapes_pairs.py --resolution {RESOLUTION})")
            out[key.replace("image", "moments")].append(np.asarray(encode(params, imgs), np.float16))
        out["instruction"] += [r["instruction"].decode() if isinstance(r["instruction"], bytes)
                               else str(r["instruction"]) for r in recs]
        bar.update(len(recs))
    bar.close()
    arrays = {k: np.concatenate(v) for k, v in out.items() if k != "instruction"}
    arrays["instruction"] = np.array(out["instruction"])
    arrays["input_ids"] = tokenize(tokenizer, out["instruction"])
    path = os.path.join(workdir, PAIRS_FILE)
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    print(f"encode: {n} pairs of {data_dir}/{name}:{split} -> {path}", flush=True)
    return {k: v.shape for k, v in arrays.items()}


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


def load_pairs(path: str) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in ("input_moments", "edited_moments", "input_ids")}


def pair_batch(pairs: dict, step: int, batch_size: int, seed: int) -> dict:
    """The batch of train step ``step``: a function of (seed, step) only, so a resumed run sees
    the same stream. Indices are drawn with replacement."""
    rng = np.random.default_rng([seed, step, 0xED17])
    idx = rng.integers(len(pairs["input_ids"]), size=batch_size)
    return {"input_moments": pairs["input_moments"][idx].astype(np.float32),
            "edited_moments": pairs["edited_moments"][idx].astype(np.float32),
            "input_ids": pairs["input_ids"][idx],
            "example_id": (step * batch_size + np.arange(batch_size)).astype(np.int32)}


def editor_models(base: dict):
    from ip2p_jax.models.clip import CLIPTextConfig, CLIPTextModel
    from ip2p_jax.models.unet import UNet2DConditionModel, UNetConfig

    unet_cfg = UNetConfig.from_dict(base["unet"], source="demo UNet config")
    text_cfg = CLIPTextConfig.from_dict(base["text_encoder"], source="demo text encoder config")
    return unet_cfg, text_cfg, UNet2DConditionModel(unet_cfg), CLIPTextModel(text_cfg)


def train_editor(workdir: str, cfg: EditorTrainConfig, pairs_path: Optional[str] = None,
                 progress: bool = True):
    """Train UNet + text encoder jointly (resumable from <workdir>/editor_state.msgpack); returns the state."""
    import flax
    import jax
    import jax.numpy as jnp

    from ip2p_jax.diffusion.schedules import TrainingSchedule
    from ip2p_jax.train.state import (OptimizerConfig, create_train_state, learning_rate_schedule,
                                      make_optimizer)
    from ip2p_jax.train.step import Models, StepConfig, make_train_step

    # the rate schedule first: a bad one fails before the pairs are loaded
    opt_cfg = OptimizerConfig(learning_rate=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
                              decay_start=cfg.decay_start, decay_steps=cfg.decay_steps,
                              weight_decay=cfg.weight_decay)
    tx, lr = make_optimizer(opt_cfg), learning_rate_schedule(opt_cfg)
    base = read_base(workdir)
    unet_cfg, text_cfg, unet, text = editor_models(base)
    pairs = load_pairs(pairs_path or os.path.join(workdir, PAIRS_FILE))
    sched = base["scheduler"]
    schedule = TrainingSchedule(num_train_timesteps=sched["num_train_timesteps"], beta_start=sched["beta_start"],
                                beta_end=sched["beta_end"], beta_schedule=sched["beta_schedule"])
    null_ids = np.full((1, 77), base["text_encoder"]["pad_token_id"], np.int32)
    null_ids[0, :2] = [base["text_encoder"]["bos_token_id"], base["text_encoder"]["eos_token_id"]]
    frozen = {"null_ids": jnp.asarray(null_ids), "alphas_cumprod": jnp.asarray(schedule.alphas_cumprod())}

    k_unet, k_text = jax.random.split(jax.random.PRNGKey(cfg.seed))
    h = unet_cfg.sample_size
    params = {
        "unet": jax.jit(lambda k: unet.init(k, jnp.zeros((1, h, h, 8)), jnp.zeros((1,), jnp.int32),
                                            jnp.zeros((1, 77, text_cfg.hidden_size)))["params"])(k_unet),
        "text_encoder": jax.jit(lambda k: text.init(k, jnp.zeros((1, 77), jnp.int32))["params"])(k_text)}
    path = os.path.join(workdir, EDITOR_STATE)
    if cfg.init_from and not os.path.isfile(path):   # a resumed run goes on from its own state
        params = warm_start_params(cfg.init_from, params)
    state = create_train_state(params, tx, cfg.seed)
    if os.path.isfile(path):
        with open(path, "rb") as f:
            state = flax.serialization.from_bytes(state, f.read())
        print(f"editor: resumed from {path} at step {int(state.step)}", flush=True)
    step_cfg = StepConfig(cond_dropout_prob=cfg.cond_dropout_prob, ema_decay=cfg.ema_decay,
                          scaling_factor=base["vae"]["scaling_factor"])
    step_fn = jax.jit(make_train_step(Models(unet=unet, text_encoder=text), step_cfg, tx, lr), donate_argnums=0)

    def save(to=path):
        tmp = f"{to}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(flax.serialization.to_bytes(jax.device_get(state)))
        os.replace(tmp, to)

    start = int(state.step)
    bar = _progress_bar(cfg.steps, start, "editor", progress)
    losses, t0 = [], time.perf_counter()
    for step in range(start, cfg.steps):
        if cfg.decay_steps > 0 and step == cfg.decay_start:
            # the cool-down is a branch: keep the constant-rate state so a later run can go on from it
            save(os.path.join(workdir, EDITOR_STATE_STABLE))
            bar.write(f"editor: constant-rate state at step {step} kept as {EDITOR_STATE_STABLE}")
        batch = pair_batch(pairs, step, cfg.batch_size, cfg.seed)
        state, metrics = step_fn(state, frozen, batch)
        losses.append(metrics["loss"])
        bar.update()
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            msg = (f"editor step {done}/{cfg.steps}  loss {float(np.mean([float(x) for x in losses])):.4f}  "
                   f"({time.perf_counter() - t0:.0f}s)")
            losses = []
            bar.write(msg) if progress else print(msg, flush=True)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save()
    bar.close()
    return state


def warm_start_params(model: str, fresh: dict) -> dict:
    """The UNet and text encoder weights of an assembled demo model, checked against the fresh init.

    The workdir's UNet may grow the model's: a cross-attention block (``attentions_<j>``) that the
    model lacks keeps its fresh weights with a zero ``proj_out``, so it starts as the identity and
    the grown network computes exactly what the model did. Anything else must match."""
    import jax
    from flax.traverse_util import flatten_dict, unflatten_dict

    from ip2p_jax.weights import load_diffusers_folder

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
        raise ValueError(f"{model}: its UNet / text encoder do not match this workdir's configs ({bad[0]}, "
                         f"{len(bad)} in all; unpack it into a fresh workdir: demo_model unpack --model {model})")
    params = dict(have)
    for k in grown:
        params[k] = np.zeros(want[k].shape, np.float32) if "proj_out" in k else np.asarray(jax.device_get(want[k]))
    if grown:
        print(f"editor: {len(new_blocks)} cross-attention blocks added to the model's UNet "
              f"(zero proj_out: they start as identities)", flush=True)
    print(f"editor: starting from the weights of {model}", flush=True)
    return unflatten_dict(params)


def read_editor_ema(workdir: str) -> dict:
    """The EMA params {'unet', 'text_encoder'} of the saved editor state (numpy)."""
    import flax

    path = os.path.join(workdir, EDITOR_STATE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing; run the editor stage first")
    with open(path, "rb") as f:
        raw = flax.serialization.msgpack_restore(f.read())
    step = int(np.asarray(raw["step"]))
    return raw["ema_params"], step


# ----------------------------------------------------------------------------- stage: assemble


def assemble(workdir: str, out: str, dtype: str = "fp16") -> str:
    """Write the EMA editor + VAE + tokenizer + scheduler as a diffusers folder."""
    from ip2p_jax.models.vae import VAEConfig
    from ip2p_jax.weights import Components, save_diffusers_folder

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
    print(f"assemble: editor step {step} -> {path} ({size / 1e6:.1f} MB)", flush=True)
    return path


# ----------------------------------------------------------------------------- helpers


class _NoBar:
    def update(self, n=1):
        pass

    def write(self, msg):
        print(msg, flush=True)

    def close(self):
        pass


def _progress_bar(total: int, initial: int, desc: str, enabled: bool):
    """tqdm when wanted and installed (the editor stage also runs where only jax/flax/optax are)."""
    if enabled:
        try:
            from tqdm.auto import tqdm
            return tqdm(total=total, initial=initial, desc=desc, unit="step")
        except ImportError:
            pass
    return _NoBar()


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
        raise FileNotFoundError(f"{path}: missing; run the vae stage first")
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
    e = sub.add_parser("encode", help="encode the TFDS pairs with the VAE into <workdir>/pairs.npz")
    e.add_argument("--workdir", required=True)
    e.add_argument("--data-dir", required=True, help="TFDS data dir (scripts/build_tfds.py --data-dir)")
    e.add_argument("--name", default="shapes")
    e.add_argument("--max-examples", type=int, default=None)
    t = sub.add_parser("editor", help="train the UNet + text encoder on <workdir>/pairs.npz")
    t.add_argument("--workdir", required=True)
    t.add_argument("--pairs", default=None, help="default: <workdir>/pairs.npz")
    for f in dataclasses.fields(EditorTrainConfig):
        t.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    a = sub.add_parser("assemble", help="write the diffusers folder")
    a.add_argument("--workdir", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--dtype", default="fp16", choices=["fp16", "fp32"])
    args = p.parse_args(argv)
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
            train_editor(args.workdir, cfg, args.pairs, progress=False)
        elif args.stage == "assemble":
            assemble(args.workdir, args.out, args.dtype)
    except (ValueError, FileNotFoundError) as e:   # bad settings, a stage not run yet
        print(f"demo_model {args.stage}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
