"""The InstructPix2Pix train step, written once; run it under pmap (axis_name) or jit (shardings).

Per example: VAE-encode the edited image (posterior sample x scaling_factor) and the input image
(posterior mode, unscaled), encode the instruction, apply conditioning dropout, add noise at a
uniform timestep, and regress eps (or v) with an MSE. Gradients are accumulated over
`grad_accum` micro-batches, averaged over devices (lax.pmean under pmap; the jit path sees the
global batch), clipped and applied by AdamW; the EMA follows. A non-finite loss, gradient
norm, new params, optimizer state or EMA skips the update (params, optimizer state and EMA
unchanged, so a checkpoint is always finite) and is counted.

Randomness is per example: keys are folded from (state.rng, state.step, batch['example_id']), so
the same global batch gives the same noise, timesteps and dropout however it is split over
devices, hosts and micro-batches.

Batches are dicts. Live path: 'input_image', 'edited_image' (B,H,W,3) uint8 (scaled to [-1, 1] here,
on the device) or float in [-1, 1], 'input_ids'
(B,77) int32. Cached path (latent_cache): 'input_moments', 'edited_moments' (B,h,w,2C) =
concat(mean, logvar), 'text_embedding' (B,77,D). Both carry 'example_id' (B,) int32.

SDXL (Models.text_encoder_2 set; live path only): 'input_ids_2' (B,77) from the second tokenizer
and optional 'time_ids' (B,6) = (original size, crop top-left, target size) of each example's crop
(default (H, W, 0, 0, H, W) of the edited image). The text conditioning is then the pytree
{'text': both encoders' penultimate states concatenated (B,77,D1+D2), 'pooled': the second
encoder's projected pooled output (B,P)} (placement.sdxl_prompt_function, as the edit builds it),
and conditioning dropout replaces both leaves together by the empty prompt's.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax

from ip2p_jax.data.augment import to_float
from ip2p_jax.diffusion.schedules import PREDICTION_TYPES, add_noise
from ip2p_jax.errors import Ip2pError
from ip2p_jax.placement import sdxl_prompt_function
from ip2p_jax.train.dropout import conditioning_dropout
from ip2p_jax.train.state import TrainState, ema_update, ravel, ravel_size, unravel_like


def model_pixels(images: jax.Array) -> jax.Array:
    """Batch images as the VAE takes them: uint8 -> [-1, 1] float32; floats pass as they are."""
    return to_float(images) if images.dtype == jnp.uint8 else images


class StepConfigError(Ip2pError):
    """Train-step settings out of range."""


@dataclasses.dataclass(frozen=True)
class StepConfig:
    grad_accum: int = 1               # micro-batches per update
    cond_dropout_prob: float = 0.05   # p: text-only / both / image-only each dropped with probability p
    prediction_type: str = "epsilon"  # or "v_prediction" (SD 2.x initialisations)
    ema_decay: float = 0.9999
    scaling_factor: float = 0.18215
    compute_dtype: Any = jnp.float32  # UNet/VAE/text compute; params stay fp32

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise StepConfigError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        if self.grad_accum < 1:
            raise StepConfigError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if not 0 <= 3 * self.cond_dropout_prob <= 1:
            raise StepConfigError(f"cond_dropout_prob must be in [0, 1/3], got {self.cond_dropout_prob}")


@dataclasses.dataclass(frozen=True)
class Models:
    """The Flax modules (compute dtype, remat and attention impl already set). vae/text_encoder may be
    None on the cached path; text_encoder_2 (CLIPTextModelWithProjection) makes it an SDXL model."""
    unet: nn.Module
    vae: Optional[nn.Module] = None
    text_encoder: Optional[nn.Module] = None
    text_encoder_2: Optional[nn.Module] = None

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None


def example_keys(step_key: jax.Array, example_ids: jax.Array) -> jax.Array:
    """(B, 4) keys per example: posterior sample, noise, timestep, dropout uniform."""
    return jax.vmap(lambda i: jax.random.split(jax.random.fold_in(step_key, i), 4))(example_ids)


def encode_conditioning(models: Models, cfg: StepConfig, params: dict, frozen: dict, batch: dict,
                        post_keys: jax.Array):
    """-> (target latents z0 (scaled sample), image latents (mode, unscaled), text emb, null text emb);
    for SDXL the text and null embeddings are {'text', 'pooled'} pytrees (see the module doc)."""
    if "edited_moments" in batch:  # latent cache
        edited_mean, edited_logvar = jnp.split(batch["edited_moments"].astype(jnp.float32), 2, axis=-1)
        image_latents = jnp.split(batch["input_moments"].astype(jnp.float32), 2, axis=-1)[0]
    else:
        # One encoder pass over both images (per-example ops: the same numbers as two passes). Rows are
        # interleaved (edited_0, input_0, edited_1, ...) so a batch-sharded array splits without moving data.
        edited, source = model_pixels(batch["edited_image"]), model_pixels(batch["input_image"])
        both = jnp.stack([edited, source], axis=1).reshape((-1,) + edited.shape[1:])
        mean, logvar = models.vae.apply({"params": frozen["vae"]}, both, method=models.vae.encode)
        pair = lambda x: x.reshape((edited.shape[0], 2) + x.shape[1:])  # noqa: E731
        mean, logvar = pair(mean), pair(logvar)
        edited_mean, edited_logvar, image_latents = mean[:, 0], logvar[:, 0], mean[:, 1]
    eps = jax.vmap(lambda k, m: jax.random.normal(k, m.shape, jnp.float32))(post_keys, edited_mean)
    latents = (edited_mean + jnp.exp(0.5 * edited_logvar) * eps) * cfg.scaling_factor

    if models.is_sdxl:   # frozen encoders (build refuses training them)
        encode = sdxl_prompt_function(models.text_encoder, models.text_encoder_2)
        text = encode({"text": frozen["text_encoder"], "text_2": frozen["text_encoder_2"]},
                      (batch["input_ids"], batch["input_ids_2"]))
        return latents, image_latents, text, frozen["null_embedding"]
    text_params = params.get("text_encoder", frozen.get("text_encoder"))
    if "text_embedding" in batch:
        text = batch["text_embedding"]
    else:
        text = models.text_encoder.apply({"params": text_params}, batch["input_ids"])
    if "text_encoder" in params:  # trained text encoder: the "" embedding moves with it
        null = models.text_encoder.apply({"params": text_params}, frozen["null_ids"])
    else:
        null = frozen["null_embedding"]
    return latents, image_latents, text, null


def make_loss_fn(models: Models, cfg: StepConfig) -> Callable:
    def loss_fn(params, frozen, batch, step_key):
        keys = example_keys(step_key, batch["example_id"])
        latents, image_latents, text, null = encode_conditioning(models, cfg, params, frozen, batch, keys[:, 0])
        if "text_encoder" not in params:
            text, null = jax.tree.map(lax.stop_gradient, (text, null))
        r = jax.vmap(lambda k: jax.random.uniform(k, ()))(keys[:, 3])
        text, image_latents = conditioning_dropout(r, cfg.cond_dropout_prob, text, null, image_latents)

        acp = frozen["alphas_cumprod"]
        t = jax.vmap(lambda k: jax.random.randint(k, (), 0, acp.shape[0]))(keys[:, 2])
        noise = jax.vmap(lambda k, z: jax.random.normal(k, z.shape, jnp.float32))(keys[:, 1], latents)
        noisy = add_noise(acp, latents, noise, t)
        if cfg.prediction_type == "epsilon":
            target = noise
        else:  # v = sqrt(ac) eps - sqrt(1 - ac) x0
            ac = acp[t][:, None, None, None]
            target = jnp.sqrt(ac) * noise - jnp.sqrt(1.0 - ac) * latents

        dt = cfg.compute_dtype
        unet_in = jnp.concatenate([noisy, image_latents], axis=-1).astype(dt)
        if models.is_sdxl:
            pred = models.unet.apply({"params": params["unet"]}, unet_in, t, text["text"].astype(dt),
                                     text_embeds=text["pooled"].astype(dt), time_ids=sdxl_time_ids(batch))
        else:
            pred = models.unet.apply({"params": params["unet"]}, unet_in, t, text.astype(dt))
        return jnp.mean(jnp.square(pred.astype(jnp.float32) - target))
    return loss_fn


def sdxl_time_ids(batch: dict) -> jax.Array:
    """(B, 6) float32 micro-conditioning: the batch's 'time_ids', else (H, W, 0, 0, H, W) of the edited
    images (an uncropped example)."""
    if "time_ids" in batch:
        return batch["time_ids"].astype(jnp.float32)
    b, h, w = batch["edited_image"].shape[:3]
    return jnp.tile(jnp.asarray([h, w, 0, 0, h, w], jnp.float32), (b, 1))


def all_finite(tree) -> jax.Array:
    """Whether every floating-point leaf of `tree` is finite (a scalar bool; True for no such leaf)."""
    ok = jnp.bool_(True)
    for leaf in jax.tree.leaves(tree):
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            ok = ok & jnp.all(jnp.isfinite(leaf))
    return ok


def micro_batches(batch: dict, k: int) -> dict:
    """(B, ...) -> (k, B/k, ...); micro-batch j holds examples j, j+k, ... so a batch sharded on its
    leading axis splits without moving data between devices."""
    def split(x):
        if x.shape[0] % k:
            raise ValueError(f"batch of {x.shape[0]} does not split into grad_accum={k} micro-batches")
        return jnp.moveaxis(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 1, 0)
    return jax.tree.map(split, batch)


def make_train_step(models: Models, cfg: StepConfig, tx: optax.GradientTransformation,
                    lr_schedule: Callable, axis_name: Optional[str] = None,
                    flat_sharding: Any = None) -> Callable:
    """The InstructPix2Pix train_step(state, frozen, batch) -> (state, metrics): `make_update_step` of
    `make_loss_fn`. frozen: {'vae', 'text_encoder' (frozen case), 'null_embedding' or 'null_ids',
    'alphas_cumprod'}."""
    ip2p_loss = make_loss_fn(models, cfg)
    return make_update_step(lambda *a: (ip2p_loss(*a), {}), cfg, tx, lr_schedule, axis_name, flat_sharding)


def make_update_step(loss_fn: Callable, cfg: StepConfig, tx: optax.GradientTransformation,
                     lr_schedule: Callable, axis_name: Optional[str] = None,
                     flat_sharding: Any = None) -> Callable:
    """train_step(state, frozen, batch) -> (state, metrics) for any loss_fn(params, frozen, batch, step_key)
    -> (loss, aux scalars): gradient accumulation (cfg.grad_accum), device averaging, AdamW on the flat
    vector, EMA (cfg.ema_decay), the non-finite guard. The aux scalars join the metrics.

    axis_name: the pmap axis to average gradients and metrics over (None under jit).
    flat_sharding: optional sharding of the flat gradient (= optimizer-state) vector (fsdp under jit):
    gradients are reduce-scattered into it.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def flat_grad(params, frozen, batch, step_key):
        (loss, aux), grads = grad_fn(params, frozen, batch, step_key)
        g = ravel(grads)
        return loss, aux, (g if flat_sharding is None else lax.with_sharding_constraint(g, flat_sharding))

    def train_step(state: TrainState, frozen: dict, batch: dict):
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        k = cfg.grad_accum
        if k == 1:
            loss, aux, flat_grads = flat_grad(state.params, frozen, batch, step_key)
        else:
            def body(carry, micro):
                loss, aux, g = flat_grad(state.params, frozen, micro, step_key)
                return jax.tree.map(jnp.add, carry, (loss, aux, g)), None
            micro = micro_batches(batch, k)
            first = jax.tree.map(lambda x: x[0], micro)
            aux_zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                     jax.eval_shape(lambda: loss_fn(state.params, frozen, first, step_key)[1]))
            flat_zeros = jnp.zeros(ravel_size(state.params), jnp.float32)
            if flat_sharding is not None:
                flat_zeros = lax.with_sharding_constraint(flat_zeros, flat_sharding)
            (loss, aux, flat_grads), _ = lax.scan(body, (jnp.zeros((), jnp.float32), aux_zeros, flat_zeros), micro)
            loss, aux, flat_grads = jax.tree.map(lambda x: x / k, (loss, aux, flat_grads))
        if axis_name is not None:
            loss, aux, flat_grads = lax.pmean((loss, aux, flat_grads), axis_name)

        flat_params = ravel(state.params)
        grad_norm = jnp.sqrt(jnp.sum(jnp.square(flat_grads)))
        updates, opt_state = tx.update(flat_grads, state.opt_state, flat_params)
        new_flat = flat_params + updates
        params = unravel_like(new_flat, state.params)
        n = state.updates + 1
        ema = ema_update(state.ema_params, params, n, cfg.ema_decay)
        # the update itself is checked too (a NaN learning rate gives finite loss and gradient, NaN params)
        finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.all(jnp.isfinite(new_flat))
                  & all_finite(opt_state) & all_finite(ema))

        def pick(new, old):
            return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = state.replace(
            step=state.step + 1,
            updates=jnp.where(finite, n, state.updates),
            params=pick(params, state.params),
            opt_state=pick(opt_state, state.opt_state),
            ema_params=pick(ema, state.ema_params),
            nonfinite_run=jnp.where(finite, 0, state.nonfinite_run + 1),
            nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "param_norm": jnp.sqrt(jnp.sum(jnp.square(jnp.where(finite, new_flat, flat_params)))),
            "learning_rate": lr_schedule(state.updates),
            "finite": finite.astype(jnp.int32),
            "nonfinite_run": new_state.nonfinite_run,
            "nonfinite_total": new_state.nonfinite_total,
            **aux,
        }
        return new_state, metrics

    return train_step
