"""Training a small KL autoencoder (diffusers `AutoencoderKL` layout) from scratch.

    params, scaling = train_autoencoder(vae_config, batches, AutoencoderTrainConfig(steps=2000),
                                        workdir="runs/vae")

Loss per image: L1 + MSE between the input and the decoded posterior sample, plus
``kl_weight`` x the KL divergence of the posterior from N(0, I) (summed over latent elements,
averaged over the batch), as in latent-diffusion's first stage without the perceptual and
adversarial terms (flat synthetic images need neither). AdamW with a short warm-up and global
norm clipping. ``batches`` yields float32 (B, H, W, 3) images in [-1, 1].

The state (params, optimizer, step, RNG) is written to ``<workdir>/vae_state.msgpack`` every
``checkpoint_every`` steps and at the end (atomically: a crash keeps the previous file); calling
again with the same workdir resumes from it. ``decoder_only`` fine-tunes the decoder (from
``init_params``) with the encoder frozen, so latents encoded before stay valid. After training, `latent_scaling_factor` measures
1 / std of the posterior means on some images: the value diffusers keeps as
``scaling_factor`` in the VAE config (0.18215 for SD's VAE).
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Iterable, Iterator, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ip2p_jax.models.vae import AutoencoderKL, VAEConfig

STATE_FILE = "vae_state.msgpack"


@dataclasses.dataclass(frozen=True)
class AutoencoderTrainConfig:
    steps: int = 2000
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    decay_steps: int = 0          # a linear cool-down of the rate to 0 over the last decay_steps steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    kl_weight: float = 1e-5
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    seed: int = 0
    decoder_only: bool = False    # freeze the encoder side (encoder, quant_conv): the latents do not change
    checkpoint_every: int = 200
    log_every: int = 50


ENCODER_SIDE = ("encoder", "quant_conv")


@flax.struct.dataclass
class AutoencoderState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    rng: jax.Array


def make_optimizer(cfg: AutoencoderTrainConfig) -> optax.GradientTransformation:
    lr = optax.warmup_constant_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1))
    if cfg.decay_steps > 0:
        cool_down = optax.linear_schedule(cfg.learning_rate, 0.0, cfg.decay_steps)
        lr = optax.join_schedules([lr, cool_down], [max(cfg.steps - cfg.decay_steps, 0)])
    parts = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm > 0 else []
    tx = optax.chain(*parts, optax.adamw(lr, weight_decay=cfg.weight_decay))
    if not cfg.decoder_only:
        return tx
    side = lambda params: {k: "frozen" if k in ENCODER_SIDE else "trained" for k in params}  # noqa: E731
    return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, side)


def init_state(model: AutoencoderKL, cfg: AutoencoderTrainConfig, tx, image_shape,
               init_params: Optional[dict] = None) -> AutoencoderState:
    key, init_key = jax.random.split(jax.random.PRNGKey(cfg.seed))
    params = jax.jit(lambda k: model.init(k, jnp.zeros((1,) + tuple(image_shape), jnp.float32))["params"])(init_key)
    if init_params is not None:
        if jax.tree.structure(init_params) != jax.tree.structure(params) or any(
                a.shape != b.shape for a, b in zip(jax.tree.leaves(init_params), jax.tree.leaves(params))):
            raise ValueError("init_params do not match the autoencoder config")
        params = jax.tree.map(jnp.asarray, init_params)
    return AutoencoderState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=key)


def loss_terms(model: AutoencoderKL, params, images, key, cfg: AutoencoderTrainConfig) -> dict:
    mean, logvar = model.apply({"params": params}, images, method=model.encode)
    if cfg.decoder_only:
        mean, logvar = jax.lax.stop_gradient((mean, logvar))
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
    recon = model.apply({"params": params}, z, method=model.decode)
    diff = recon - images
    l1, mse = jnp.mean(jnp.abs(diff)), jnp.mean(jnp.square(diff))
    kl = 0.5 * jnp.mean(jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3)))
    loss = cfg.l1_weight * l1 + cfg.mse_weight * mse + cfg.kl_weight * kl
    psnr = 10.0 * jnp.log10(4.0 / jnp.maximum(jnp.mean(jnp.square(jnp.clip(recon, -1, 1) - images)), 1e-10))
    return {"loss": loss, "l1": l1, "mse": mse, "kl": kl, "psnr": psnr}


def make_train_step(model: AutoencoderKL, cfg: AutoencoderTrainConfig, tx):
    def step(state: AutoencoderState, images):
        key = jax.random.fold_in(state.rng, state.step)

        def loss_fn(p):
            terms = loss_terms(model, p, images, key, cfg)
            return terms["loss"], terms

        (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), terms
    return jax.jit(step, donate_argnums=0)


def save_state(state: AutoencoderState, workdir: str) -> None:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, STATE_FILE)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(flax.serialization.to_bytes(jax.device_get(state)))
    os.replace(tmp, path)


def restore_state(template: AutoencoderState, workdir: str) -> Optional[AutoencoderState]:
    path = os.path.join(workdir, STATE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        try:
            return flax.serialization.from_bytes(template, f.read())
        except Exception as e:  # a state of another model size, or a damaged file
            raise ValueError(f"{path}: cannot resume from it ({type(e).__name__}: {e}); "
                             f"use another workdir or delete it") from e


def train_autoencoder(vae_config: VAEConfig, batches: Iterable[np.ndarray], cfg: AutoencoderTrainConfig,
                      workdir: Optional[str] = None, progress: bool = True,
                      init_params: Optional[dict] = None) -> dict:
    """Train (or resume) and return the params (numpy pytree). ``init_params``: start from these
    (a saved state in ``workdir`` takes precedence); required with ``cfg.decoder_only``."""
    if cfg.decoder_only and init_params is None:
        raise ValueError("decoder_only fine-tunes a trained autoencoder: pass its init_params")
    from tqdm.auto import tqdm

    model = AutoencoderKL(vae_config)
    tx = make_optimizer(cfg)
    batches = iter(batches)
    first = np.asarray(next(batches), np.float32)
    state = init_state(model, cfg, tx, first.shape[1:], init_params)
    if workdir:
        restored = restore_state(state, workdir)
        if restored is not None:
            state = restored
            print(f"autoencoder: resumed from {workdir}/{STATE_FILE} at step {int(state.step)}", flush=True)
    step_fn = make_train_step(model, cfg, tx)
    start = int(state.step)
    bar = tqdm(total=cfg.steps, initial=start, desc="autoencoder", unit="step", disable=not progress)
    window: list[dict] = []
    t0 = time.perf_counter()
    batch = first
    for step in range(start, cfg.steps):
        state, terms = step_fn(state, jnp.asarray(batch))
        window.append(terms)
        bar.update()
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            avg = {k: float(np.mean([float(w[k]) for w in window])) for k in window[0]}
            window = []
            msg = (f"autoencoder step {done}/{cfg.steps}  loss {avg['loss']:.4f}  l1 {avg['l1']:.4f}  "
                   f"psnr {avg['psnr']:.1f} dB  kl {avg['kl']:.1f}  ({time.perf_counter() - t0:.0f}s)")
            bar.write(msg) if progress else print(msg, flush=True)
        if workdir and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            save_state(state, workdir)
        if done < cfg.steps:
            batch = np.asarray(next(batches), np.float32)
    bar.close()
    return jax.device_get(state.params)


def encode_moments(vae_config: VAEConfig, params, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """(N, H, W, 3) in [-1, 1] -> (N, h, w, 2C) float32 concat(mean, logvar)."""
    model = AutoencoderKL(vae_config)
    fn = jax.jit(lambda p, x: jnp.concatenate(model.apply({"params": p}, x, method=model.encode), axis=-1))
    out = [np.asarray(fn(params, jnp.asarray(images[i:i + batch_size], jnp.float32)))
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out, axis=0)


def reconstruct(vae_config: VAEConfig, params, images: np.ndarray) -> np.ndarray:
    """Decode the posterior mode of each image: (N, H, W, 3) in [-1, 1] -> the same."""
    model = AutoencoderKL(vae_config)
    return np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x))(params, jnp.asarray(images)))


def reconstruction_psnr(vae_config: VAEConfig, params, images: np.ndarray) -> float:
    """Mean PSNR (dB, 8-bit scale) of mode reconstructions of `images` ([-1, 1])."""
    rec = np.clip(reconstruct(vae_config, params, images), -1, 1)
    to8 = lambda x: np.rint((x + 1) * 127.5)  # noqa: E731
    mse = np.mean((to8(rec) - to8(images)) ** 2, axis=(1, 2, 3))
    return float(np.mean(10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))))


def latent_scaling_factor(moments: np.ndarray) -> float:
    """1 / std of the posterior means (first half of the channels of `moments`)."""
    c = moments.shape[-1] // 2
    return float(1.0 / np.std(moments[..., :c]))


def image_batches(images: np.ndarray, batch_size: int, seed: int = 0, flip: bool = True) -> Iterator[np.ndarray]:
    """Endless shuffled batches of uint8 (N, H, W, 3) images as float32 in [-1, 1] (optional h-flips)."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(images))
        for i in range(0, len(order) - batch_size + 1, batch_size):
            b = images[order[i:i + batch_size]].astype(np.float32) / 127.5 - 1.0
            if flip:
                mask = rng.random(batch_size) < 0.5
                b[mask] = b[mask, :, ::-1]
            yield b
