"""Text-to-image sampling of prompt pairs with Prompt-to-Prompt self-attention injection.

One jitted function samples a batch of P pairs: every step is one UNet call on 4P rows, per
pair (the authors' order) [uncond img0, uncond img1, cond img0, cond img1], where img0 is
conditioned on the input caption and img1 on the edited caption. Both images of a pair start
from the same noise and get the same ancestral noise. While a pair's step index i is below its
`inject_steps`, the img1 rows take every self-attention's probabilities from the img0 rows
(uncond from uncond, cond from cond). CFG scale and inject_steps are traced per-pair values,
so varying them never recompiles; the sampler and the step count are part of the compile.
The batch is split over the mesh and each device samples its own pairs (shard_map: no traffic
between devices), so a pair's result depends on the pairs per device, not on the device or
process count. The loop is ip2p_jax.diffusion.samplers.sample; the model is placed by
ip2p_jax.placement.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from ip2p_jax import dtypes, placement, sharding
from ip2p_jax.diffusion import samplers
from ip2p_jax.diffusion.schedules import TrainingSchedule
from ip2p_jax.errors import Ip2pError
from ip2p_jax.tokenizer import tokenize
from ip2p_jax.weights import load

ROWS_PER_PAIR = 4            # [uncond img0, uncond img1, cond img0, cond img1]
_INJECTED_SOURCE = np.array([0, 0, 2, 2])   # img1 rows read img0's maps (authors' sims[0], sims[2])


class PairModelError(Ip2pError):
    """A model that cannot generate pairs (e.g. an InstructPix2Pix UNet); the message names it."""


class PairRequestError(Ip2pError):
    """Pair-sampling inputs that do not fit the model or each other; the message says how."""


def injected_steps(p2p_threshold: float, steps: int) -> int:
    """How many leading steps copy self-attention: the authors inject at step i when
    `threshold > i / (steps - 1)` (so even threshold 1 leaves the last step free). For one
    step (where the authors' formula divides by zero) the only step is injected iff threshold > 0."""
    if steps == 1:
        return int(p2p_threshold > 0)
    return sum(1 for i in range(steps) if p2p_threshold > i / (steps - 1))


def self_attn_source(inject: jax.Array) -> jax.Array:
    """(P,) bool per pair -> (4P,) int32 row each UNet row takes its self-attention maps from."""
    pairs = inject.shape[0]
    base = jnp.arange(pairs, dtype=jnp.int32)[:, None] * ROWS_PER_PAIR
    offset = jnp.where(inject[:, None], jnp.asarray(_INJECTED_SOURCE, jnp.int32), jnp.arange(4, dtype=jnp.int32))
    return (base + offset).reshape(-1)


def _pair_text(cond: jax.Array, null: jax.Array) -> jax.Array:
    """(P, 2, L, D) caption embeddings [input, edited] and (L, D) null -> (4P, L, D) UNet rows."""
    null = jnp.broadcast_to(null.astype(cond.dtype), cond.shape)
    return jnp.stack([null, cond], axis=1).reshape((-1,) + cond.shape[2:])


def _make_generate_function(unet, vae, scaling: float, mesh: Mesh):
    batch, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)

    def generate(params, plan, noise, seeds, cond, null, cfg_scale, inject_steps):
        pairs, shape = noise.shape[0], noise.shape[1:]
        # Image rows [pair0 img0, pair0 img1, pair1 img0, ...]; both images of a pair share the
        # start noise and (through the same key) every step's ancestral noise.
        x = jnp.repeat(noise.astype(jnp.float32), 2, axis=0)
        keys = jax.vmap(jax.random.key)(jnp.repeat(seeds, 2))
        text = _pair_text(cond, null)
        cfg = cfg_scale.astype(jnp.float32).reshape((pairs, 1) + (1,) * len(shape))

        def guided_eps(x_in, t, i):   # i: the step, for the injection schedule
            rows = jnp.broadcast_to(x_in.reshape((pairs, 1, 2) + shape), (pairs, 2, 2) + shape)
            eps = unet.apply({"params": params["unet"]}, rows.reshape((-1,) + shape), t, text,
                             self_attn_source(i < inject_steps))
            eps = eps.astype(jnp.float32).reshape((pairs, 2, 2) + shape)
            uncond, cond_eps = eps[:, 0], eps[:, 1]
            return (uncond + cfg * (cond_eps - uncond)).reshape((-1,) + shape)

        latents = samplers.sample(guided_eps, x, plan, keys)
        decoded = vae.apply({"params": params["vae"]}, latents / scaling, method=vae.decode)
        images = jnp.clip(decoded.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
        return images.reshape((pairs, 2) + images.shape[1:])

    # Each device samples its own pairs (shard_map): the injection's row gather stays inside a
    # device's rows instead of XLA all-gathering every layer's attention probabilities.
    row, whole = PartitionSpec(sharding.DATA), PartitionSpec()
    per_device = jax.shard_map(generate, mesh=mesh, in_specs=(whole, whole, row, row, row, whole, row, row),
                               out_specs=row, check_vma=False)
    return jax.jit(per_device, in_shardings=(rep, rep, batch, batch, batch, rep, batch, batch), out_shardings=batch)


def _make_text_function(text_encoder):
    return jax.jit(lambda p, ids: text_encoder.apply({"params": p}, ids))


def _process_copy(tree):
    """This process's own copy (on one of its devices) of replicated params: computations on it
    involve no other process."""
    return jax.tree.map(lambda a: a.addressable_data(0), tree)


class PairSampler:
    """A Stable Diffusion text-to-image model placed on a ('data',) mesh, ready to sample pairs.

    components: ip2p_jax.weights.Components of a text-to-image model (UNet input channels =
    latent channels). dtype: None (bf16 on GPU/TPU, fp32 on CPU) or a name / dtype.
    """

    def __init__(self, components, *, dtype=None, mesh: Mesh | None = None, source: str = ""):
        c = components
        self.source = source or c.source or "model"
        latent = c.vae_config.latent_channels
        if c.unet_config.in_channels != latent:
            raise PairModelError(
                f"{self.source}: its UNet takes {c.unet_config.in_channels} input channels; generating pairs "
                f"needs a text-to-image Stable Diffusion model ({latent}), not an InstructPix2Pix one")
        self.model = placement.place(c, dtype=dtype, mesh=mesh)
        m = self.model
        self.dtype, self.mesh, self.params, self.tokenizer = m.dtype, m.mesh, m.params, m.tokenizer
        self.unet_config, self.vae_config, self.text_config = c.unet_config, c.vae_config, c.text_config
        self.vae_scale = 2 ** (len(c.vae_config.block_out_channels) - 1)
        self.latent_multiple = 2 ** (len(c.unet_config.block_out_channels) - 1)
        self.training_schedule = TrainingSchedule.from_config(dict(c.scheduler_config or {}))
        self._generate = placement.compiled(_make_generate_function, self.model.unet, self.model.vae,
                                            float(c.vae_config.scaling_factor), self.mesh)
        self._text = placement.compiled(_make_text_function, self.model.text_encoder)
        self._text_params = _process_copy(self.params["text"])

    @classmethod
    def from_pretrained(cls, path: str, *, dtype=None, mesh: Mesh | None = None, **load_kwargs) -> "PairSampler":
        """Load a diffusers folder or single-file checkpoint (see ip2p_jax.weights.load)."""
        d = dtypes.compute_dtype(dtype)
        return cls(load(path, dtype=np.dtype(d), **load_kwargs), dtype=d, mesh=mesh, source=str(path))

    @property
    def num_devices(self) -> int:
        return sharding.data_size(self.mesh)

    @property
    def num_local_devices(self) -> int:
        """Devices of the mesh that belong to this process."""
        return sharding.local_size(self.mesh)

    def plan(self, steps: int, sampler: str = "euler_a", schedule: str | None = None) -> samplers.Plan:
        """Sampler plan for this model's training betas (euler_a + "kdiffusion" = the authors')."""
        return samplers.make_plan(sampler, steps, schedule, training=self.training_schedule)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(h, w, C) latents of a square image; raises PairRequestError if the size does not fit the model."""
        multiple = self.vae_scale * self.latent_multiple
        if isinstance(resolution, bool) or int(resolution) != resolution or resolution < multiple \
                or resolution % multiple:
            raise PairRequestError(f"resolution must be a positive multiple of {multiple} for {self.source}, "
                                   f"got {resolution!r}")
        side = int(resolution) // self.vae_scale
        return side, side, self.vae_config.latent_channels

    def encode_text(self, texts) -> np.ndarray:
        """(N, 77, D) last hidden states; batches padded to a power of two (few compiled shapes).
        Process-local: each process encodes its own prompts, no other process takes part."""
        ids = tokenize(self.tokenizer, list(texts))
        n = len(ids)
        ids = sharding.pad_rows(ids, sharding.bucket_size(n, minimum=2))
        return np.asarray(self._text(self._text_params, ids))[:n]

    def generate(self, plan: samplers.Plan, noise, seeds, cond, null, cfg_scale, inject_steps) -> jax.Array:
        """Start sampling this process's P pairs of one global batch (asynchronously;
        `sharding.to_local(result, mesh)` waits and returns them). Collective: every process calls
        it at once with the same P, a multiple of its device count; the rows stay on their process
        (jax.make_array_from_process_local_data; with one process that is every row).

        noise (P, h, w, C) standard normal start noise; seeds (P,) uint32 (ancestral noise at step
        i: normal(fold_in(key(seed), i))); cond (P, 2, 77, D) [input, edited] caption embeddings;
        null (77, D) the empty prompt's; cfg_scale (P,) float; inject_steps (P,) int (see
        injected_steps). Returns the global (P * processes, 2, H, W, 3) float32 images in [0, 1],
        batch-sharded.
        """
        arrays = [np.asarray(noise, np.float32), np.asarray(seeds, np.uint32), np.asarray(cond),
                  np.asarray(cfg_scale, np.float32), np.asarray(inject_steps, np.int32)]
        local = self.num_local_devices
        if len({len(a) for a in arrays}) != 1 or len(arrays[0]) % local:
            raise PairRequestError(f"generate: per-pair inputs have lengths {[len(a) for a in arrays]}; they "
                                   f"must agree and be a multiple of this process's {local} devices")
        noise, seeds, cond, cfg_scale, inject_steps = (sharding.local_to_global(a, self.mesh) for a in arrays)
        null = sharding.to_global(np.asarray(null), sharding.replicated(self.mesh))
        return self._generate(self.params, plan, noise, seeds, cond, null, cfg_scale, inject_steps)
