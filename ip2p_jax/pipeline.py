"""EditPipeline: edit images from written instructions with an InstructPix2Pix model.

    pipe = EditPipeline.from_pretrained("path/or/owner-name")
    result = pipe.edit(image, "make it winter", seed=0)
    result.images[0].save("winter.png"); result.settings[0]["seed"]

This is the one place that knows the 3-way guidance batch: the whole edit (VAE encode of the
input's posterior mode, every sampler step over [cond, image-only, uncond] rows, VAE decode) is
one jitted function over a ('data',) device mesh: the batch axis is sharded, params replicated.
Each output's noise comes from its own seed (starting noise: numpy PCG64(seed); ancestral noise
at step i: threefry fold_in(key(seed), i)), so results depend neither on the device count nor
on the rest of the batch.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from ip2p_jax import adapters, dtypes, masks, placement, sharding, turns as turnlib
from ip2p_jax import images as imlib
from ip2p_jax.diffusion import guidance, masking, samplers
from ip2p_jax.diffusion.schedules import ScheduleError, noise_schedule_from_config
from ip2p_jax.edit_request import (SDXL_TEXT_SCALE, TEXT_SCALE, EditError, check_request, output_seeds, per_item,
                                   random_scales)
from ip2p_jax.models.unet import step_embeddings
from ip2p_jax.progress import progress as progress_bar
from ip2p_jax.tokenizer import MAX_LENGTH
from ip2p_jax.weights import load
from ip2p_jax.weights import lora as lora_files
from ip2p_jax.weights.diffusers_folder import check_text_conditioning

log = logging.getLogger(__name__)

PER_DEVICE_BATCH = 8               # default edits per device in one compiled call (GPU, TPU)
# On CPU devices per-image cost grows past 2 rows per device (demo model, 2 cores, 16 images:
# 11.1 img/s at 2 per device, 10.3 at 4, 6.3 at 8), so larger requests become several calls there,
# each dispatched before the previous one is collected.
CPU_PER_DEVICE_BATCH = 2
FALLBACK_RESOLUTION = 512          # models whose UNet config gives no sample_size


@dataclasses.dataclass
class EditOutput:
    image: Any            # PIL RGB
    array: np.ndarray     # float32 (H, W, 3) in [0, 1], before 8-bit rounding
    settings: dict        # everything needed to reproduce it (seed included)


@dataclasses.dataclass
class EditResult:
    """Outputs in order: image 0 samples 0..n-1, image 1 samples 0..n-1, ..."""
    outputs: list

    @property
    def images(self) -> list:
        return [o.image for o in self.outputs]

    @property
    def arrays(self) -> list:
        return [o.array for o in self.outputs]

    @property
    def settings(self) -> list:
        return [o.settings for o in self.outputs]

    @property
    def seeds(self) -> list:
        return [o.settings["seed"] for o in self.outputs]


@dataclasses.dataclass
class _Job:
    index: int
    pair: int
    sample: int
    image: Any                 # resized PIL image the model edits
    instruction: str
    seed: int
    text_scale: float
    image_scale: float
    settings: dict
    mask: np.ndarray | None = None   # float32 (H, W) in [0, 1] at the edit size; None: edit everywhere

    @property
    def unchanged(self) -> bool:
        """Nothing to edit (empty instruction, or an all-black mask): the resized input is the result."""
        return self.instruction == "" or (self.mask is not None and not self.mask.any())


class EditPipeline:
    """An InstructPix2Pix model placed on a device mesh, ready to edit.

    components: ip2p_jax.weights.Components (configs, numpy params, tokenizer, scheduler config).
    dtype: params and compute dtype (None: bf16 on GPU/TPU, fp32 on CPU; see ip2p_jax.dtypes).
    mesh: a ('data',) mesh (default: all devices; see ip2p_jax.sharding.data_mesh).
    attention_impl: "auto" (Pallas kernel on TPU, cuDNN on GPU in bf16/fp16, else XLA), "xla", "cudnn" or
      "pallas" (forced: a TPU program from any host; see models.layers.attention).
    The model is placed on the mesh by ip2p_jax.placement.
    SDXL models (components with a second text encoder) edit through the same API: their text
    conditioning is diffusers' (placement.sdxl_prompt_function); is_cosxl_edit (None: the folder's
    model_index.json setting) multiplies the image latents by the VAE scaling factor (CosXL Edit).
    """

    def __init__(self, components, *, dtype=None, mesh: Mesh | None = None, attention_impl: str = "auto",
                 source: str | None = None, is_cosxl_edit: bool | None = None):
        c = components
        if mesh is not None and (sharding.DATA not in mesh.axis_names or len(mesh.axis_names) != 1):
            raise EditError(f"EditPipeline needs a 1-D ('data',) mesh, got axes {mesh.axis_names}")
        latent = c.vae_config.latent_channels
        if c.unet_config.in_channels != 2 * latent:
            raise EditError(f"{source or c.source or 'model'}: not an InstructPix2Pix model: its UNet takes "
                            f"{c.unet_config.in_channels} input channels, editing needs {2 * latent} "
                            "(noisy latents + image latents)")
        check_text_conditioning(c, source or c.source or "model")
        self.model = placement.place(c, dtype=dtype, mesh=mesh, attention_impl=attention_impl)
        m = self.model
        self.dtype, self.vae_dtype, self.mesh, self.tokenizer = m.dtype, m.vae_dtype, m.mesh, m.tokenizer
        self.unet, self.vae, self.text_encoder = m.unet, m.vae, m.text_encoder
        self.source = source or c.source or ""
        self.vae_scale = 2 ** (len(c.vae_config.block_out_channels) - 1)   # pixels per latent
        self.unet_config, self.vae_config, self.text_config = c.unet_config, c.vae_config, c.text_config
        self.scheduler_config = dict(c.scheduler_config or {})
        # DDPM betas (TrainingSchedule) or EDM sigmas (EDMSchedule: CosXL), with the prediction type
        self.training_schedule = noise_schedule_from_config(self.scheduler_config,
                                                            source=f"{self.source or 'model'}: scheduler config")
        self.is_sdxl = c.is_sdxl
        settings = dict(c.pipeline_config or {})
        self.force_zeros_for_empty_prompt = bool(settings.get("force_zeros_for_empty_prompt", True))
        self.is_cosxl_edit = bool(settings.get("is_cosxl_edit", False) if is_cosxl_edit is None else is_cosxl_edit)
        # CosXL Edit conditions on scaled image latents; everything else on the unscaled mode
        self._image_latent_scale = float(self.vae_config.scaling_factor) if self.is_cosxl_edit else 1.0
        self._edit_jit = self._compiled_edit(guidance.FULL, 0.0)
        self._autoencode_jit = placement.compiled(_make_autoencode_function, self.vae)
        self._local_text_jit = (placement.compiled(_make_local_sdxl_function, self.text_encoder,
                                                   self.model.text_encoder_2, self.mesh) if self.is_sdxl else
                                placement.compiled(_make_local_text_function, self.text_encoder, self.mesh))
        self._loras: dict = {}          # name -> (LoraFile, scale), in load order
        self._lora_base: dict | None = None   # the params["unet"/"text"] the LoRAs are added to

    @property
    def params(self) -> dict:
        """{"unet", "vae", "text"} params on the mesh (replace entries to edit with other weights)."""
        return self.model.params

    @params.setter
    def params(self, value: dict) -> None:
        self.model.params = value

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str, *, dtype=None, mesh: Mesh | None = None,
                        attention_impl: str = "auto", is_cosxl_edit: bool | None = None,
                        **load_kwargs) -> "EditPipeline":
        """Load a diffusers folder (SD or SDXL InstructPix2Pix), single-file checkpoint or hub id
        (see ip2p_jax.weights.load)."""
        d = dtypes.compute_dtype(dtype)
        components = load(path_or_hub_id, dtype=np.dtype(d), **load_kwargs)
        return cls(components, dtype=d, mesh=mesh, attention_impl=attention_impl,
                   source=str(path_or_hub_id), is_cosxl_edit=is_cosxl_edit)

    def _compiled_edit(self, branches, guidance_rescale: float, masked: bool = False):
        key = (self.unet, self.vae, float(self.vae_config.scaling_factor), self.mesh)
        if self._image_latent_scale != 1.0 or guidance_rescale or masked:
            key += (branches, self._image_latent_scale, float(guidance_rescale), masked)
        elif branches != guidance.FULL:
            key += (branches,)
        return placement.compiled(_make_edit_function, *key)

    # ------------------------------------------------------------------ LoRAs

    def load_lora(self, path: str, scale: float = 1.0, name: str | None = None) -> str:
        """Add a diffusers / PEFT / kohya LoRA file (or a folder with pytorch_lora_weights.safetensors) at
        `scale`; returns its name (default: the file's stem). Several can be loaded; loading a name again
        replaces it. The sum of their updates is merged into the UNet / text-encoder kernels once (fp32,
        then the pipeline's dtype), so edits run at the base model's speed; the base weights are kept
        beside them (one more UNet in memory) for `unload_lora` and new scales."""
        scale = float(scale)
        if not np.isfinite(scale):
            raise EditError(f"LoRA {path}: scale must be a finite number, got {scale}")
        lora = lora_files.read_lora(path)
        base = self._lora_base or {"unet": self.params["unet"], "text": self.params["text"]}
        lora_files.check_lora_fits(lora, {"unet": base["unet"], "text_encoder": base["text"]})
        if name is None:
            stem = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
            name = os.path.basename(os.path.dirname(lora.source)) if stem == "pytorch_lora_weights" else stem
        self._lora_base = base
        self._loras[name] = (lora, scale)
        self._merge_loras()
        return name

    def unload_lora(self, name: str | None = None) -> None:
        """Remove one LoRA (by name) or all of them (None): the base weights come back."""
        if name is not None and name not in self._loras:
            raise EditError(f"no LoRA named {name!r} is loaded (loaded: {', '.join(self._loras) or 'none'})")
        for n in ([name] if name is not None else list(self._loras)):
            del self._loras[n]
        self._merge_loras()

    @property
    def loras(self) -> dict:
        """{name: scale} of the loaded LoRAs."""
        return {n: s for n, (_, s) in self._loras.items()}

    def _merge_loras(self) -> None:
        if self._lora_base is None:
            return
        merged = {}
        for part, key in (("unet", "unet"), ("text_encoder", "text")):
            used = [(lf, s) for lf, s in self._loras.values() if part in lf.adapters]
            if not used:
                merged[key] = self._lora_base[key]
                continue
            pairs = [(lf.adapters[part], np.float32(s)) for lf, s in used]
            factors = [lf.factors[part] for lf, _ in used]
            fn = jax.jit(lambda b, p: adapters.apply_loras(b, p, factors),
                         out_shardings=sharding.replicated(self.mesh))
            merged[key] = fn(self._lora_base[key], pairs)
        self.params = dict(self.params, **merged)
        if not self._loras:
            self._lora_base = None

    @property
    def native_resolution(self) -> int:
        """The image side the model was trained at, the default edit resolution: the UNet's
        sample_size times the VAE factor (512 for SD 1.5, 64 for the demo model)."""
        size = self.unet_config.sample_size
        if isinstance(size, (list, tuple)):
            size = max(size)
        # 64: the least size the authors' resize rule gives
        return max(64, int(size) * self.vae_scale) if size else FALLBACK_RESOLUTION

    @property
    def num_devices(self) -> int:
        return sharding.data_size(self.mesh)

    @property
    def num_local_devices(self) -> int:
        """Devices of the mesh that belong to this process."""
        return sharding.local_size(self.mesh)

    # ------------------------------------------------------------------ compiled pieces

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """(N, 77, D) last hidden states in the compute dtype. Batches are padded to a power of two
        so a few compiled shapes serve every call."""
        return self.model.encode_text(texts)

    def encode_prompts(self, texts: Sequence[str]):
        """The UNet's text conditioning of `texts` (host numpy): SD, encode_text's (N, 77, D); SDXL,
        {"text": (N, 77, D1 + D2), "pooled": (N, P)} (placement.sdxl_prompt_function)."""
        return self.model.encode_prompts(texts)

    def null_conditioning(self, empty=None):
        """The null-text branches' conditioning: the encoding of "" (`empty`, if already encoded),
        or for an SDXL model with force_zeros_for_empty_prompt (diffusers' default) zeros, as
        diffusers builds the unconditional embeddings without a negative prompt."""
        empty = self.encode_prompts([""]) if empty is None else empty
        empty = jax.tree.map(lambda a: a[-1], empty)
        if self.is_sdxl and self.force_zeros_for_empty_prompt:
            return jax.tree.map(np.zeros_like, empty)
        return empty

    @staticmethod
    def time_ids(height: int, width: int, rows: int) -> np.ndarray:
        """SDXL's micro-conditioning per row: (original size, crop top-left, target size) =
        (h, w, 0, 0, h, w) of the edited image, float32 (rows, 6)."""
        return np.tile(np.array([height, width, 0, 0, height, width], np.float32), (rows, 1))

    def autoencode(self, images: Sequence) -> list:
        """Each RGB PIL image (all one size, a multiple of the VAE factor) through the VAE: the
        decoded posterior mode, i.e. the best any editor's output can look with this VAE."""
        out = []
        for i in range(0, len(images), 64):
            x = np.stack([imlib.to_model_array(im) for im in images[i:i + 64]])
            out += [imlib.from_unit_array(a) for a in sharding.to_host(self._autoencode_jit(self.params["vae"], x))]
        return out

    @staticmethod
    def initial_noise(seed: int, shape: tuple[int, ...]) -> np.ndarray:
        """An output's standard normal starting noise, from its seed alone (host numpy, PCG64)."""
        return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)

    @property
    def default_text_scale(self) -> float:
        """The text guidance scale an edit uses unless told: 5.0 for SDXL editors (diffusers' SDXL
        pipeline), else 7.5 (the authors')."""
        return SDXL_TEXT_SCALE if self.is_sdxl else TEXT_SCALE

    @property
    def default_sampler(self) -> str:
        """The sampler edits use when none is given: euler_a, or edm_euler for an EDM model (CosXL)."""
        return samplers.default_sampler(self.training_schedule)

    def plan(self, sampler: str | None, steps: int, schedule: str | None = None) -> samplers.Plan:
        """The sampler plan (schedule arrays) for this model's noise schedule (None: default_sampler).
        Only the training betas (or EDM sigma settings) and the prediction type come from the
        model's scheduler config: step spacing is the sampler's own (e.g. DDIM always uses SD's
        steps_offset=1), so a sampler means the same thing with every model folder. DDPM samplers
        refuse EDM models and edm_euler refuses DDPM ones (ScheduleError naming the model)."""
        sampler = sampler or self.default_sampler
        samplers.check_names(sampler, steps, schedule)
        try:
            return samplers.make_plan(sampler, steps, schedule, training=self.training_schedule)
        except ScheduleError as e:
            raise ScheduleError(f"{self.source or 'model'}: {e}") from None

    # ------------------------------------------------------------------ editing

    def edit(self, images, instructions, *, progress: bool = True, **kwargs) -> EditResult:
        """Edit each image with its instruction; returns an EditResult (outputs in order).

        images: one or a list of PIL images, arrays (HW / HWC; uint8, uint16 or float in [0, 1])
          or file paths. instructions: one string (for every image) or one per image; "" returns
          the resized input. A single image with several instructions edits it once per instruction.
        steps, sampler ("euler_a", "euler", "ddim", "dpmpp_2m"; "edm_euler" for EDM models such as
          CosXL; None: default_sampler), schedule (None: the sampler's default; see
          ip2p_jax.diffusion.samplers.make_plan).
        text_scale, image_scale: numbers or one per image (a guidance sweep is one call); text_scale
          None: default_text_scale (7.5; 5.0 for SDXL).
        randomize_scales: draw text scale in U[6, 9] and image scale in U[1.2, 1.8] per image.
        seed: None (random, reported), an int (output i gets seed + i) or one per image (sample k
          of image j gets seed[j] + k). An output's noise depends only on its seed.
        latents: optional initial noise (outputs, H/8, W/8, 4), standard normal, unscaled.
        num_samples: outputs per image. resolution (default: the model's native_resolution),
          resize ("authors" | "keep"): see ip2p_jax.images.resize_for_edit.
        batch_size: edits per compiled call (default 8 per device).
        names: labels for messages and settings (default "image 0", ...). max_pixels: input limit.
        mask: None, one mask for every image or one per image (None entries: unmasked): a PIL image,
          array or file path (ip2p_jax.masks.load_mask), white = editable, grey = partly, any size
          with the image's aspect; resized with the image. Outside it the result keeps the input:
          the sample is blended after every step with the input's latents noised to that step,
          then the decoded result is composited with the input (`mask_composite=False`: no
          composite, the VAE decodes the whole image). An all-black mask returns the input (warned).
        mask_blur: feathering radius in pixels (Gaussian) of the mask, at the edit size.
        """
        outs = sorted(self.iter_edit(images, instructions, progress=progress, **kwargs),
                      key=lambda o: o.settings["index"])
        return EditResult(outs)

    def iter_edit(self, images, instructions, *, steps: int = 100, text_scale=None, image_scale=1.5,
                  sampler: str | None = None, schedule: str | None = None, seed=None, latents=None,
                  num_samples: int = 1, resolution: int | None = None, resize: str = "authors",
                  randomize_scales: bool = False, batch_size: int | None = None, names=None,
                  max_pixels: int = imlib.DEFAULT_MAX_PIXELS, max_edit_pixels: int = imlib.DEFAULT_MAX_EDIT_PIXELS,
                  mask=None, mask_blur: float = 0.0, mask_composite: bool = True,
                  guidance_rescale: float = 0.0, progress: bool = False) -> Iterator[EditOutput]:
        """Like `edit`, yielding each output as soon as its batch is done (not necessarily in order)."""
        check_request(steps=steps, num_samples=num_samples, batch_size=batch_size, text_scale=text_scale,
                      image_scale=image_scale, guidance_rescale=guidance_rescale)
        sampler = sampler or self.default_sampler
        plan = self.plan(sampler, steps, schedule)   # validates sampler / steps / schedule first
        resolution = self.native_resolution if resolution is None else resolution
        jobs = self._jobs(images, instructions, steps=steps, text_scale=text_scale, image_scale=image_scale,
                          sampler=sampler, seed=seed,
                          schedule=schedule or samplers.default_schedule(sampler, self.training_schedule),
                          num_samples=num_samples, resolution=resolution, resize=resize,
                          randomize_scales=randomize_scales, names=names, max_pixels=max_pixels,
                          max_edit_pixels=max_edit_pixels, mask=mask, mask_blur=mask_blur,
                          mask_composite=mask_composite)
        noise = self._check_latents(latents, jobs)
        if guidance_rescale:
            for jb in jobs:
                jb.settings["guidance_rescale"] = float(guidance_rescale)
        bar = progress_bar(total=len(jobs), desc="editing", unit="img", enabled=progress)
        try:
            for job in jobs:
                if job.unchanged:   # nothing to do: the resized input itself
                    arr = np.asarray(job.image, np.float32) / 255.0
                    yield EditOutput(job.image.copy(), arr, job.settings)
                    bar.update(1)
            work = [j for j in jobs if not j.unchanged]
            if not work:
                return
            texts = sorted({j.instruction for j in work})
            emb = self.encode_prompts(texts + [""])
            row = {t: i for i, t in enumerate(texts)}
            null = self.null_conditioning(emb)
            groups: dict[tuple, list[_Job]] = {}
            for j in work:   # masked rows run the masked program, the others exactly today's
                groups.setdefault((j.image.size, j.mask is not None), []).append(j)
            chunks = []
            for group in groups.values():
                size = self._call_size(len(group), batch_size)
                chunks += [(group[i:i + size], size) for i in range(0, len(group), size)]
            pending = None   # dispatch chunk k+1 before collecting chunk k: host and device overlap
            for chunk, size in chunks + [(None, 0)]:
                try:
                    started = (self._dispatch(plan, chunk, size, emb, row, null, noise, guidance_rescale)
                               if chunk else None)
                except Exception:
                    if pending is not None:   # hand out finished work before the error propagates
                        for out in self._collect(*pending):
                            yield out
                    raise
                if pending is not None:
                    for out in self._collect(*pending):
                        yield out
                        bar.update(1)
                pending = started
        finally:
            bar.close()

    def edit_sequence(self, images, turns, *, seed=None, names=None, resolution: int | None = None,
                      resize: str = "authors", mask=None, max_pixels: int = imlib.DEFAULT_MAX_PIXELS,
                      max_edit_pixels: int = imlib.DEFAULT_MAX_EDIT_PIXELS, progress: bool = False,
                      **kwargs) -> list[EditResult]:
        """Multi-turn sessions: each turn's instruction applied to the previous turn's output.

        images: one or a list (one session each). turns: instructions, or objects with
          "instruction" and per-turn settings (ip2p_jax.turns.TURN_SETTINGS, e.g. "seed",
          "text_scale", "mask") overriding `kwargs` (edit()'s settings) for that turn.
        A turn edits the previous turn's 8-bit output (what a user chaining edits would do with the
        saved PNGs), so a session equals chained edit() calls. Every session advances one turn per
        edit() call (batched across images). seed: see ip2p_jax.turns (one image: seed, seed + 1, ...).
        mask (one, or one per image) applies to every turn without its own; masks are given for
        the inputs and resized with them. Returns one EditResult per turn (outputs in image
        order); each output's settings add turn, turns, previous_seed and history (earlier turns).
        """
        turns = turnlib.normalize(turns)
        if kwargs.get("num_samples", 1) != 1 or kwargs.get("latents") is not None:
            raise EditError("edit_sequence: num_samples must be 1 and latents unset (each turn edits one output)")
        if kwargs.get("randomize_scales"):
            raise EditError("edit_sequence: randomize_scales does not apply; give scales per turn")
        imgs = list(images) if isinstance(images, (list, tuple)) else [images]
        names = [str(x) for x in names] if names is not None else [
            os.fspath(x) if isinstance(x, (str, os.PathLike)) else f"image {i}" for i, x in enumerate(imgs)]
        if not imgs or len(names) != len(imgs):
            raise EditError(f"edit_sequence needs at least one image and one name per image, got "
                            f"{len(imgs)} images and {len(names)} names")
        resolution = self.native_resolution if resolution is None else resolution
        if resize not in imlib.RESIZE_MODES:
            raise EditError(f"resize must be one of {imlib.RESIZE_MODES}, got {resize!r}")
        seeds = turnlib.session_seeds(seed, len(imgs), turns)
        inputs = [_resized_input(im, nm, resize=resize, resolution=resolution, max_pixels=max_pixels,
                                 max_edit_pixels=max_edit_pixels) for im, nm in zip(imgs, names)]

        def fitted(source, j):   # (mask of input j at its edit size (later turns edit that size), its label)
            if source is None:
                return None, None
            label = os.fspath(source) if isinstance(source, (str, os.PathLike)) else f"mask of {names[j]}"
            in_size, img = inputs[j]
            return masks.fit_mask(masks.load_mask(source, name=label), in_size, img.size, mode=resize,
                                  name=label), label

        def per_image(value):
            vals = list(value) if isinstance(value, (list, tuple)) else [value] * len(imgs)
            if len(vals) != len(imgs):
                raise EditError(f"{len(vals)} masks for {len(imgs)} images (give one mask, or one per image)")
            return [fitted(v, j) for j, v in enumerate(vals)]

        session_masks = per_image(mask)
        current = [img for _, img in inputs]
        results = []
        bar = progress_bar(total=len(turns) * len(imgs), desc="turns", unit="img", enabled=progress)
        try:
            for t, turn in enumerate(turns):
                own = {k: v for k, v in turn.items() if k not in ("instruction", "seed", "mask")}
                turn_masks = per_image(turn["mask"]) if "mask" in turn else session_masks
                given = [m for m, _ in turn_masks]
                res = self.edit(current, turn["instruction"], seed=seeds[t], names=names, resolution=resolution,
                                resize=resize, max_pixels=max_pixels, max_edit_pixels=max_edit_pixels,
                                mask=given if any(m is not None for m in given) else None,
                                progress=False, **{**kwargs, **own})
                for j, out in enumerate(res.outputs):
                    out.settings.update(turnlib.turn_settings(turns, seeds, t, j), input_size=list(inputs[j][0]))
                    if turn_masks[j][1] is not None:
                        out.settings["mask"] = turn_masks[j][1]
                results.append(res)
                current = [o.image for o in res.outputs]
                bar.update(len(imgs))
        finally:
            bar.close()
        return results

    def _call_size(self, n: int, batch_size: int | None) -> int:
        """Rows per compiled call: batch_size (fixed, so every call reuses one compiled function),
        or by default the next power of two >= n up to PER_DEVICE_BATCH (CPU: CPU_PER_DEVICE_BATCH)
        per device; always a multiple of the device count."""
        if batch_size is not None:
            return sharding.padded_size(batch_size, self.num_devices)
        cpu = self.mesh.devices.flat[0].platform == "cpu"
        cap = (CPU_PER_DEVICE_BATCH if cpu else PER_DEVICE_BATCH) * self.num_devices
        return sharding.padded_size(min(cap, sharding.bucket_size(n)), self.num_devices)

    def _dispatch(self, plan, chunk: list, size: int, emb, row, null, noise, guidance_rescale: float = 0.0):
        """Start one compiled edit on `chunk` (padded to `size` rows); returns (device result, chunk)."""
        batch = sharding.batch_sharding(self.mesh)
        rep = sharding.replicated(self.mesh)
        pad = lambda a: sharding.to_global(sharding.pad_rows(np.asarray(a), size), batch)  # noqa: E731
        pixels = pad(np.stack([imlib.to_model_array(j.image) for j in chunk]))
        w, h = chunk[0].image.size
        cond = self._conditioning_rows(emb, [row[j.instruction] for j in chunk], h, w)
        cond = jax.tree.map(pad, cond)
        seed_rows = sharding.pad_rows(np.array([j.seed for j in chunk], np.uint32), size)
        ts = pad(np.array([j.text_scale for j in chunk], np.float32))
        iscale = pad(np.array([j.image_scale for j in chunk], np.float32))
        f = self.vae_scale
        shape = (h // f, w // f, self.vae_config.latent_channels)
        init = pad(np.stack([self.initial_noise(j.seed, shape) for j in chunk]) if noise is None
                   else noise[[j.index for j in chunk]])
        masked = any(j.mask is not None for j in chunk)
        fn = self._edit_function([j.text_scale for j in chunk], [j.image_scale for j in chunk], guidance_rescale,
                                 masked)
        extra = ()
        if masked:   # every row of a masked chunk has its mask
            extra = (pad(np.stack([j.mask for j in chunk])[..., None]),
                     pad(np.array([j.settings["mask_composite"] for j in chunk], np.bool_)))
        out = fn(self.params, samplers.generic_plan(plan), pixels, cond,
                 jax.tree.map(lambda a: sharding.to_global(a, rep), null), sharding.to_global(seed_rows, batch),
                 init, ts, iscale, *extra)
        return out, chunk

    def _conditioning_rows(self, emb, rows, height: int, width: int):
        """The instruction conditioning of `rows` of encode_prompts' `emb`; SDXL adds time ids."""
        cond = jax.tree.map(lambda a: a[rows], emb)
        if self.is_sdxl:
            cond["time_ids"] = self.time_ids(height, width, len(rows))
        return cond

    def _edit_function(self, text_scales, image_scales, guidance_rescale: float = 0.0, masked: bool = False):
        """The compiled edit for these rows: fewer guidance branches where their scales make that
        exact (one compile per branch set), else the full 3-way one; `masked`: the variant taking
        per-row masks (a separate compile, so unmasked requests run exactly today's program)."""
        branches = guidance.branches_for(list(text_scales), list(image_scales))
        if branches == guidance.FULL and not guidance_rescale and not masked:
            return self._edit_jit
        return self._compiled_edit(branches, guidance_rescale, masked)

    def export(self, *, batch: int, size, steps: int, sampler: str | None = None, schedule: str | None = None,
               platform: str | None = None):
        """The whole compiled edit (VAE encode, every sampler step, VAE decode; sharded over this
        pipeline's mesh) as a jax.export.Exported for `platform` ("cpu", "cuda", "tpu"; default the
        default backend). Serialise with `.serialize()`, reload with jax.export.deserialize and run
        with `.call(params, plan, pixels, cond, null, seeds, init_noise, text_scale, image_scale)`,
        no tracing: plan = export_plan(pipe.plan(sampler, steps, schedule)) (run-time data: any
        sampler of that step count), the rest what edit() feeds its compiled function (shapes:
        `exported.in_avals`). A TPU program from another host needs attention_impl="pallas".
        batch: rows per call (a multiple of the device count); size: image side or (height, width)."""
        check_request(steps=steps, batch_size=batch)
        if batch % self.num_devices:
            raise EditError(f"export: batch {batch} is not a multiple of the {self.num_devices} devices")
        h, w = (size, size) if np.ndim(size) == 0 else size
        f = self.vae_scale
        if h % f or w % f:
            raise EditError(f"export: size {h}x{w} is not a multiple of the VAE factor {f}")
        template = samplers.generic_plan(self.plan(sampler, steps, schedule))
        edit_jit = self._edit_jit
        run = jax.jit(lambda params, plan, *rest: edit_jit(params, template.replace(**plan), *rest))
        sds = jax.ShapeDtypeStruct
        abstract = lambda tree: jax.tree.map(lambda a: sds(a.shape, a.dtype), tree)  # noqa: E731
        cond, null = self._conditioning_avals(batch)
        args = (abstract(self.params), abstract(export_plan(template)),
                sds((batch, h, w, 3), jnp.float32), cond, null,
                sds((batch,), jnp.uint32), sds((batch, h // f, w // f, self.vae_config.latent_channels), jnp.float32),
                sds((batch,), jnp.float32), sds((batch,), jnp.float32))
        return jax.export.export(run, platforms=[platform or jax.default_backend()])(*args)

    def _conditioning_avals(self, batch: int):
        """Shapes of the compiled edit's (cond, null) arguments."""
        sds = jax.ShapeDtypeStruct
        text = (MAX_LENGTH, self.unet_config.cross_attention_dim)
        if not self.is_sdxl:
            return sds((batch,) + text, self.dtype), sds(text, self.dtype)
        pooled = (self.unet_config.pooled_dim,)
        cond = {"text": sds((batch,) + text, self.dtype), "pooled": sds((batch,) + pooled, self.dtype),
                "time_ids": sds((batch, 6), jnp.float32)}
        return cond, {"text": sds(text, self.dtype), "pooled": sds(pooled, self.dtype)}

    @staticmethod
    def _collect(out, chunk: list) -> list:
        arrays = sharding.to_host(out)[:len(chunk)]
        return [EditOutput(imlib.from_unit_array(a), a, j.settings) for j, a in zip(chunk, arrays)]

    def edit_local_batch(self, images: Sequence, instructions: Sequence[str], seeds: Sequence[int],
                         text_scales: Sequence[float], image_scales: Sequence[float], *, steps: int,
                         sampler: str | None = None, schedule: str | None = None) -> np.ndarray:
        """This process's rows of one global batch -> their edits, float32 (n, H, W, 3) in [0, 1].

        Collective: every process calls it at once with the same number of rows (a multiple of
        its device count), all images resized already and of one size. Rows stay on their own
        process (jax.make_array_from_process_local_data; nothing is all-gathered), so a pod's hosts
        each read and write only their own share. Row i's result depends only on its own inputs
        and seed, and with a fixed number of rows per device, not on the process or device count.
        """
        check_request(steps=steps, text_scale=list(text_scales), image_scale=list(image_scales))
        plan = self.plan(sampler, steps, schedule)
        n, local = len(images), self.num_local_devices
        if n == 0 or n % local or not len(instructions) == len(seeds) == len(text_scales) == len(image_scales) == n:
            raise EditError(f"edit_local_batch needs one instruction, seed and scale pair per image and a row "
                            f"count that divides over this process's {local} devices; got {n} images")
        sizes = {im.size for im in images}
        if len(sizes) != 1:
            raise EditError(f"edit_local_batch: images of one size needed, got {sorted(sizes)}")
        w, h = sizes.pop()
        f = self.vae_scale
        glob = lambda a: sharding.local_to_global(a, self.mesh)  # noqa: E731
        ids = jax.tree.map(glob, self.model.token_ids(list(instructions)))
        if self.is_sdxl:
            cond = dict(self._local_text_jit(self.model.prompt_params(), ids),
                        time_ids=glob(self.time_ids(h, w, n)))
        else:
            cond = self._local_text_jit(self.params["text"], ids)
        shape = (h // f, w // f, self.vae_config.latent_channels)
        init = glob(np.stack([self.initial_noise(int(s), shape) for s in seeds]))
        pixels = glob(np.stack([imlib.to_model_array(im) for im in images]))
        rep = sharding.replicated(self.mesh)
        # the scales are those of every process's rows (a collective call needs one program on all)
        all_scales = multihost_utils.process_allgather(np.asarray([text_scales, image_scales], np.float32))
        fn = self._edit_function(np.ravel(all_scales[..., 0, :]), np.ravel(all_scales[..., 1, :]))
        out = fn(self.params, samplers.generic_plan(plan), pixels, cond,
                 jax.tree.map(lambda a: sharding.to_global(a, rep), self.null_conditioning()),
                 glob(np.asarray(seeds, np.uint32)), init,
                 glob(np.asarray(text_scales, np.float32)), glob(np.asarray(image_scales, np.float32)))
        return sharding.to_local(out, self.mesh)

    # ------------------------------------------------------------------ request -> jobs

    def _jobs(self, images, instructions, *, steps, text_scale, image_scale, sampler, schedule, seed,
              num_samples, resolution, resize, randomize_scales, names, max_pixels, max_edit_pixels,
              mask=None, mask_blur=0.0, mask_composite=True) -> list:
        if resize not in imlib.RESIZE_MODES:
            raise EditError(f"resize must be one of {imlib.RESIZE_MODES}, got {resize!r}")
        if isinstance(num_samples, bool) or int(num_samples) != num_samples or num_samples < 1:
            raise EditError(f"num_samples must be a positive integer, got {num_samples!r}")
        if resize == "authors" and (int(resolution) != resolution or resolution < 64):
            raise EditError(f"resolution must be an integer >= 64, got {resolution!r}")
        imgs = list(images) if isinstance(images, (list, tuple)) else [images]
        texts = [instructions] if isinstance(instructions, str) else list(instructions)
        if not imgs or not texts:
            raise EditError("edit needs at least one image and one instruction")
        if any(not isinstance(t, str) for t in texts):
            raise EditError("instructions must be strings")
        if len(imgs) == 1 and len(texts) > 1:
            imgs = imgs * len(texts)
        elif len(texts) == 1:
            texts = texts * len(imgs)
        elif len(texts) != len(imgs):
            raise EditError(f"{len(imgs)} images but {len(texts)} instructions: give one instruction, "
                            "one image, or as many of each")
        n = len(imgs)
        names = [str(x) for x in names] if names is not None else [
            x if isinstance(x, (str, os.PathLike)) else f"image {i}" for i, x in enumerate(imgs)]
        if len(names) != n:
            raise EditError(f"{len(names)} names for {n} images")
        names = [os.fspath(x) for x in names]

        mask_list = list(mask) if isinstance(mask, (list, tuple)) else [mask] * n
        if len(mask_list) != n:
            raise EditError(f"{len(mask_list)} masks for {n} images (give one mask, or one per image; None: unmasked)")
        blur = masks.check_blur(mask_blur) if any(m is not None for m in mask_list) else 0.0
        seeds = output_seeds(seed, n, num_samples)
        t_scales = per_item(text_scale, n, "text_scale", default=self.default_text_scale)
        i_scales = per_item(image_scale, n, "image_scale")
        if randomize_scales:
            t_scales, i_scales = random_scales(seeds[0][0], n)

        resized: dict[int, tuple] = {}   # the same input object is read and resized once
        jobs = []
        for j in range(n):
            key = id(imgs[j])
            if key not in resized:
                resized[key] = _resized_input(imgs[j], names[j], resize=resize, resolution=resolution,
                                              max_pixels=max_pixels, max_edit_pixels=max_edit_pixels)
            in_size, img = resized[key]
            job_mask, mask_settings = None, {}
            if mask_list[j] is not None:
                mkey = (id(mask_list[j]), key)
                if mkey not in resized:
                    resized[mkey] = self._mask(mask_list[j], in_size, img.size, resize, blur, names[j])
                job_mask, mask_settings = resized[mkey]
                mask_settings = dict(mask_settings, mask_composite=bool(mask_composite))
            for k in range(num_samples):
                settings = {
                    "index": len(jobs), "pair_index": j, "sample_index": k, "name": names[j],
                    "instruction": texts[j], "seed": seeds[j][k],
                    "text_scale": t_scales[j], "image_scale": i_scales[j],
                    "steps": steps, "sampler": sampler, "schedule": schedule,
                    "resize": resize, "resolution": resolution if resize == "authors" else None,
                    "input_size": list(in_size), "size": list(img.size), "dtype": self.dtype.name,
                }
                settings.update(mask_settings)
                if self._loras:
                    settings["loras"] = [{"name": n, "file": lf.source, "scale": sc} for n, (lf, sc) in self._loras.items()]
                if texts[j] == "":
                    settings["note"] = "empty instruction: the resized input is returned unchanged"
                elif job_mask is not None and not job_mask.any():
                    settings["note"] = "all-black mask: the resized input is returned unchanged"
                jobs.append(_Job(len(jobs), j, k, img, texts[j], seeds[j][k], t_scales[j], i_scales[j], settings,
                                 job_mask))
        if randomize_scales:
            for jb in jobs:
                jb.settings["randomized_scales"] = True
        return jobs

    @staticmethod
    def _mask(source, image_size, edit_size, resize: str, blur: float, name: str):
        """(float32 mask at the edit size or None (all white: nothing kept), its settings) of one image."""
        label = os.fspath(source) if isinstance(source, (str, os.PathLike)) else f"mask of {name}"
        fitted = masks.fit_mask(masks.load_mask(source, name=label), image_size, edit_size, mode=resize, name=label)
        arr = masks.feather(fitted, blur)
        settings = {"mask": label, "mask_blur": blur}
        if not arr.any():
            log.warning("%s: the mask is all black (nothing is editable): the input is returned unchanged", label)
        elif arr.min() == 1.0:
            arr = None   # all white: an ordinary edit
        return arr, settings

    def _check_latents(self, latents, jobs) -> np.ndarray | None:
        if latents is None:
            return None
        lat = np.asarray(latents, np.float32)
        sizes = {j.image.size for j in jobs}
        if len(sizes) != 1:
            raise EditError("latents can only be given when every output has the same size; got sizes "
                            f"{sorted(sizes)}")
        w, h = sizes.pop()
        f = self.vae_scale
        want = (len(jobs), h // f, w // f, self.vae_config.latent_channels)
        if lat.shape != want:
            raise EditError(f"latents must have shape (outputs, H/8, W/8, C) = {want} (NHWC), got {lat.shape}")
        for jb in jobs:
            jb.settings["latents"] = "given"
        return lat


# ---------------------------------------------------------------------- the compiled edit

def _make_edit_function(unet, vae, scaling: float, mesh: Mesh, branches=guidance.FULL,
                        image_latent_scale: float = 1.0, guidance_rescale: float = 0.0, masked: bool = False):
    """The whole edit as one jitted function; the sampler is run-time data (samplers.generic_plan:
    per-step coefficients of one formula), so one compile serves all four.

    cond / null: the text conditioning (guidance.expand_conditioning): SD's (B, L, D) / (L, D)
    embeddings, or SDXL's {"text", "pooled", "time_ids"} / {"text", "pooled"}. `masked` adds two
    inputs: mask (B, H, W, 1) float32 in [0, 1] (1 = editable) and composite (B,) bool (whether the
    decoded row is composited with the input under the mask); see diffusion/masking.py."""
    batch, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)

    def edit(params, plan, pixels, cond, null, seeds, init_noise, text_scale, image_scale, mask=None,
             composite=None):
        # pixels (B, H, W, 3) in [-1, 1]; the input's latents are the posterior mode, unscaled
        # (CosXL Edit: times the scaling factor).
        mode, _ = vae.apply({"params": params["vae"]}, pixels, method=vae.encode)
        image_latents = jax.lax.with_sharding_constraint(
            mode * image_latent_scale if image_latent_scale != 1.0 else mode, batch)
        noise = jax.lax.with_sharding_constraint(init_noise.astype(jnp.float32), batch)

        step_temb = step_embeddings(unet, params["unet"], plan.timesteps)   # (steps, D): once, not per step

        def model_fn(x, t, text, i):   # the guidance batch: rows [cond, image-only, uncond] (or `branches`) per example
            temb = step_temb[i][None]
            if isinstance(text, dict):   # SDXL
                return unet.apply({"params": params["unet"]}, x, t, text["text"], text_embeds=text["pooled"],
                                  time_ids=text["time_ids"], temb=temb)
            return unet.apply({"params": params["unet"]}, x, t, text, temb=temb)

        eps_fn = guidance.guided_eps_fn(model_fn, image_latents, cond, null, text_scale, image_scale, branches,
                                        guidance_rescale)
        step_keys = jax.vmap(jax.random.key)(seeds)   # per-output threefry keys for the ancestral noise
        after_step = None
        if masked:   # outside the mask: the input's latents noised to each step's level
            clean = mode.astype(jnp.float32) * scaling
            f = pixels.shape[1] // noise.shape[1]
            after_step = masking.blend_after_step(plan, clean, noise, masking.latent_mask(mask, f))
        latents = samplers.sample(eps_fn, noise, plan, step_keys, after_step=after_step)
        decoded = vae.apply({"params": params["vae"]}, latents / scaling, method=vae.decode)
        out = jnp.clip(decoded.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
        if masked:   # the final pixel composite: kept pixels are the input's own
            m = jnp.where(composite[:, None, None, None], mask, 1.0)
            out = m * out + (1.0 - m) * (pixels.astype(jnp.float32) / 2 + 0.5)
        return out

    # pixels (B, H, W, 3) float32 has the output's shape: donate it so XLA can reuse the buffer.
    donate = () if jax.default_backend() == "cpu" else (2,)
    shardings = (rep, rep, batch, batch, rep, batch, batch, batch, batch) + (batch, batch) * masked
    return jax.jit(sharding.traced_on(mesh, edit), in_shardings=shardings, out_shardings=batch,
                   donate_argnums=donate)


def _make_local_text_function(text_encoder, mesh: Mesh):
    """The text encoder over batch-sharded token ids (each process's own rows)."""
    return jax.jit(sharding.traced_on(mesh, lambda p, ids: text_encoder.apply({"params": p}, ids)),
                   out_shardings=sharding.batch_sharding(mesh))


def _make_local_sdxl_function(text_encoder, text_encoder_2, mesh: Mesh):
    """SDXL's text conditioning over batch-sharded token id pairs (each process's own rows)."""
    return jax.jit(sharding.traced_on(mesh, placement.sdxl_prompt_function(text_encoder, text_encoder_2)),
                   out_shardings=sharding.batch_sharding(mesh))


def export_plan(plan: samplers.Plan) -> dict:
    """A sampler plan as the plain dict of arrays an exported edit takes (see EditPipeline.export)."""
    return {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan) if f.name != "sampler"}


def _make_autoencode_function(vae):
    return jax.jit(lambda p, x: jnp.clip(
        vae.apply({"params": p}, x.astype(vae.dtype)).astype(jnp.float32) / 2 + 0.5, 0.0, 1.0))


def _resized_input(src, name: str, *, resize: str, resolution: int, max_pixels: int, max_edit_pixels: int):
    """(input size, the RGB image the model edits) of one image, path or array."""
    rgb = (imlib.load_image(os.fspath(src), max_pixels=max_pixels)
           if isinstance(src, (str, os.PathLike)) else imlib.to_rgb(src, name=name))
    imlib.check_pixels(rgb.size, max_pixels, name=name)
    return rgb.size, imlib.resize_for_edit(rgb, mode=resize, resolution=resolution, name=name,
                                           max_edit_pixels=max_edit_pixels)
