"""The KL autoencoder (diffusers `AutoencoderKL` layout) as a task of the one training loop.

    ip2p train --config configs/autoencoder.py:demo --workdir runs/vae     # or the demo's vae stage

Loss per image: L1 + MSE between the input and the decoded posterior sample, plus
``kl_weight`` x the KL divergence of the posterior from N(0, I) (summed over latent elements,
averaged over the batch), as in latent-diffusion's first stage without the perceptual and
adversarial terms (flat synthetic images need neither). The loop's update step (AdamW with
warm-up, optional cool-down and global-norm clipping, EMA, non-finite guard), orbax checkpoints
and resume. ``model.decoder_only`` fine-tunes the decoder of trained params
(``model.init_params``, a flax msgpack file) with the encoder frozen (zero gradients), so latents
encoded before stay valid. After training, `latent_scaling_factor` measures 1 / std of the
posterior means on some images: the value diffusers keeps as ``scaling_factor`` in the VAE config
(0.18215 for SD's VAE). The export is the trained (not EMA) params as ``vae_params.msgpack``.
"""
from __future__ import annotations

import dataclasses
import logging
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np

from ip2p_jax.errors import Ip2pError
from ip2p_jax.models.vae import AutoencoderKL, VAEConfig
from ip2p_jax.train.parallel import fetch
from ip2p_jax.train.scene_crops import SceneCrops
from ip2p_jax.train.step import StepConfig
from ip2p_jax.train.task import Task, abstract_like

log = logging.getLogger(__name__)

PARAMS_FILE = "vae_params.msgpack"
ENCODER_SIDE = ("encoder", "quant_conv")


class AutoencoderConfigError(Ip2pError):
    """Autoencoder settings that do not fit together."""


@dataclasses.dataclass(frozen=True)
class AutoencoderLoss:
    kl_weight: float = 1e-5
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    decoder_only: bool = False    # freeze the encoder side (encoder, quant_conv): the latents do not change


def loss_terms(model: AutoencoderKL, params, images, noise_keys, cfg: AutoencoderLoss) -> dict:
    """noise_keys: (B,) keys, one per image, for its posterior sample."""
    mean, logvar = model.apply({"params": params}, images, method=model.encode)
    if cfg.decoder_only:
        mean, logvar = jax.lax.stop_gradient((mean, logvar))
    eps = jax.vmap(lambda k, m: jax.random.normal(k, m.shape, m.dtype))(noise_keys, mean)
    z = mean + jnp.exp(0.5 * logvar) * eps
    recon = model.apply({"params": params}, z, method=model.decode)
    diff = recon - images
    l1, mse = jnp.mean(jnp.abs(diff)), jnp.mean(jnp.square(diff))
    kl = 0.5 * jnp.mean(jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3)))
    loss = cfg.l1_weight * l1 + cfg.mse_weight * mse + cfg.kl_weight * kl
    psnr = 10.0 * jnp.log10(4.0 / jnp.maximum(jnp.mean(jnp.square(jnp.clip(recon, -1, 1) - images)), 1e-10))
    return {"loss": loss, "l1": l1, "mse": mse, "kl": kl, "psnr": psnr}


def make_loss_fn(model: AutoencoderKL, cfg: AutoencoderLoss):
    """loss(params, frozen, batch, step_key) -> (loss, terms) for step.make_update_step; the noise of
    each image is keyed on its global example_id (the same however the batch is split)."""
    def loss_fn(params, frozen, batch, step_key):
        keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(batch["example_id"])
        terms = loss_terms(model, params, batch["image"], keys, cfg)
        return terms["loss"], {k: v for k, v in terms.items() if k != "loss"}
    return loss_fn


def init_params(vae_config: VAEConfig, seed: int, image_size: int) -> dict:
    model = AutoencoderKL(vae_config)
    x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    return jax.jit(lambda k: model.init(k, x)["params"])(jax.random.key(seed))


def read_params(path: str, like: dict) -> dict:
    with open(path, "rb") as f:
        params = flax.serialization.from_bytes(jax.tree.map(np.asarray, like), f.read())
    if jax.tree.structure(params) != jax.tree.structure(like) or any(
            np.shape(a) != np.shape(b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(like))):
        raise AutoencoderConfigError(f"{path}: the params do not match the autoencoder config")
    return params


def write_params(params: dict, out_dir: str) -> str:
    """<out_dir>/vae_params.msgpack, atomically (a crash leaves the previous file)."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, PARAMS_FILE)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(flax.serialization.to_bytes(jax.tree.map(np.asarray, params)))
    os.replace(tmp, path)
    return path


def autoencoder_task(config):
    """The loop's Task for config.task == 'autoencoder' (configs/autoencoder.py)."""
    m, d = config.model, config.data
    vae_config = VAEConfig.from_dict(dict(m.vae), source="config.model.vae")
    loss_cfg = AutoencoderLoss(kl_weight=config.loss.kl_weight, l1_weight=config.loss.l1_weight,
                               mse_weight=config.loss.mse_weight, decoder_only=m.decoder_only)
    if m.decoder_only and not m.init_params:
        raise AutoencoderConfigError("model.decoder_only fine-tunes a trained autoencoder: give model.init_params "
                                     "(its vae_params.msgpack)")
    if m.decoder_only and config.optim.weight_decay:
        raise AutoencoderConfigError("model.decoder_only needs optim.weight_decay=0 (the frozen encoder must not "
                                     "decay)")
    if d.source != "shapes_scenes":
        raise AutoencoderConfigError(f"config.data.source: the autoencoder reads 'shapes_scenes', got {d.source!r}")
    model = AutoencoderKL(vae_config)
    abstract = abstract_like(jax.eval_shape(lambda: init_params(vae_config, config.seed, d.crop)))

    def fresh():
        params = jax.device_get(init_params(vae_config, config.seed, d.crop))
        return read_params(m.init_params, params) if m.init_params else params

    def data():
        return SceneCrops(global_batch_size=config.train.batch_size, seed=config.seed, crop=d.crop, pool=d.pool,
                          refresh=d.refresh, process_index=jax.process_index(), process_count=jax.process_count())

    def export(state, out_dir: str) -> str:
        path = write_params(fetch(state.params), out_dir) if jax.process_index() == 0 else out_dir
        log.info("exported the autoencoder params to %s", path)
        return path

    start = m.init_params or "a random init"
    notes = [f"autoencoder: {'decoder fine-tune (encoder frozen)' if m.decoder_only else 'training'} from {start}"]
    return Task(abstract_params=abstract, init_params=fresh, frozen={},
                step_config=StepConfig(ema_decay=config.train.ema_decay), loss_fn=make_loss_fn(model, loss_cfg),
                make_data=data, export=export, notes=notes)


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
