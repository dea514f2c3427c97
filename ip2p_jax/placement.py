"""Putting a model on devices, one way for every user of a model.

    model = place(components, dtype="bf16")            # Flax modules + params replicated on the mesh
    emb = model.encode_text(["make it winter", ""])    # (N, 77, D) host numpy
    cond = model.encode_prompts(["make it winter"])    # the UNet's text conditioning (SDXL: a dict)

EditPipeline (and through it the training sampler) and the pair stage's PairSampler place their
Stable Diffusion / InstructPix2Pix models with `place`; the CLIP metrics place theirs with
`place_params`. The rules, in one place:
- params and compute in one dtype (ip2p_jax.dtypes; None: bf16 on GPU/TPU, fp32 on CPU), except
  the VAE of a model whose config asks for `force_upcast`, which runs in fp32 when the dtype is
  fp16 (fp16 overflows in SD's VAE at large sizes; bf16 is fine), as diffusers does;
- params replicated on a ('data',) mesh (ip2p_jax.sharding), the batch axis sharded;
- batches padded to a power of two (sharding.bucket_size), so a few compiled shapes serve every call;
- jitted functions are built once per model shape and shared (`compiled`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ip2p_jax import dtypes, sharding
from ip2p_jax.models.clip import CLIPTextModel, CLIPTextModelWithProjection
from ip2p_jax.models.unet import UNet2DConditionModel
from ip2p_jax.models.vae import AutoencoderKL
from ip2p_jax.tokenizer import tokenize

# Least recently used first; bounded, so a long-lived process (the web UI) serving many model
# shapes keeps at most MAX_COMPILED jitted functions (and their compiles) alive.
MAX_COMPILED = 32
_COMPILED: dict = {}   # insertion order is use order


def compiled(build: Callable, *key) -> Callable:
    """`build(*key)`, built once per distinct (build, *key) and then shared: models of the same
    shape (Flax modules hash by their frozen config fields) reuse one jitted function and its
    compiles. At most MAX_COMPILED are kept; the least recently used is dropped first."""
    k = (build,) + key
    fn = _COMPILED.pop(k) if k in _COMPILED else build(*key)
    _COMPILED[k] = fn                  # (re)inserted last: the most recently used
    while len(_COMPILED) > MAX_COMPILED:
        del _COMPILED[next(iter(_COMPILED))]
    return fn


def vae_dtype(dtype, vae_config) -> jnp.dtype:
    """The dtype the VAE runs in: fp32 for an fp16 model whose VAE config has force_upcast."""
    dtype = jnp.dtype(dtype)
    upcast = dtype == jnp.dtype(jnp.float16) and getattr(vae_config, "force_upcast", False)
    return jnp.dtype(jnp.float32) if upcast else dtype


def cast(tree: Any, dtype) -> Any:
    """Every array of a params pytree as a jax array of `dtype`."""
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)


def place_params(tree: Any, dtype, mesh: Mesh | None = None) -> Any:
    """Params cast to `dtype` and replicated on `mesh` (None: on the default device)."""
    tree = cast(tree, dtype)
    return jax.device_put(tree) if mesh is None else sharding.replicate(tree, mesh)


def _text_function(text_encoder: CLIPTextModel, mesh: Mesh):
    return jax.jit(sharding.traced_on(mesh, lambda p, ids: text_encoder.apply({"params": p}, ids)),
                   out_shardings=sharding.replicated(mesh))


def sdxl_prompt_function(text_encoder: CLIPTextModel, text_encoder_2: CLIPTextModelWithProjection):
    """SDXL's text conditioning as diffusers' encode_prompt builds it, a pure function
    (params {"text", "text_2"}, (ids, ids_2)) -> {"text": (N, L, D1 + D2), "pooled": (N, P)}:
    both encoders' penultimate hidden states (no final layer norm) concatenated on features, and
    the second encoder's projected pooled output."""
    def encode(params, ids):
        ids_1, ids_2 = ids
        h1 = text_encoder.apply({"params": params["text"]}, ids_1, penultimate=True)
        h2, pooled = text_encoder_2.apply({"params": params["text_2"]}, ids_2, penultimate=True)
        return {"text": jnp.concatenate([h1, h2.astype(h1.dtype)], axis=-1), "pooled": pooled}
    return encode


def _sdxl_prompt_jit(text_encoder, text_encoder_2, mesh: Mesh):
    return jax.jit(sharding.traced_on(mesh, sdxl_prompt_function(text_encoder, text_encoder_2)),
                   out_shardings=sharding.replicated(mesh))


@dataclasses.dataclass
class PlacedModel:
    """A Stable Diffusion / InstructPix2Pix model on a ('data',) mesh.

    params: {"unet", "vae", "text"} replicated pytrees (the VAE's in `vae_dtype`, the rest in
    `dtype`); callers may replace entries (the training sampler swaps in new EMA weights).
    SDXL models also have text_encoder_2 / tokenizer_2 and params["text_2"].
    """
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    params: dict
    tokenizer: Any
    dtype: jnp.dtype
    vae_dtype: jnp.dtype
    mesh: Mesh
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: Any = None

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    def token_ids(self, texts: Sequence[str]):
        """Token ids (N, 77) of `texts`; SDXL: a pair, one per tokenizer (they pad differently)."""
        ids = tokenize(self.tokenizer, list(texts))
        return (ids, tokenize(self.tokenizer_2, list(texts))) if self.is_sdxl else ids

    def prompt_params(self) -> dict:
        """The text encoders' params sdxl_prompt_function takes."""
        return {"text": self.params["text"], "text_2": self.params["text_2"]}

    def encode_prompts(self, texts: Sequence[str]):
        """The UNet's text conditioning of `texts`, host numpy in the compute dtype: SD, the
        (N, 77, D) last hidden states (encode_text); SDXL, {"text": (N, 77, D1 + D2), "pooled": (N, P)}
        (sdxl_prompt_function). Batches are padded to a power of two."""
        if not self.is_sdxl:
            return self.encode_text(texts)
        n = len(texts)
        ids = jax.tree.map(lambda a: sharding.to_global(sharding.pad_rows(a, sharding.bucket_size(n, minimum=2)),
                                                        sharding.replicated(self.mesh)), self.token_ids(texts))
        fn = compiled(_sdxl_prompt_jit, self.text_encoder, self.text_encoder_2, self.mesh)
        return jax.tree.map(lambda a: sharding.to_host(a)[:n], fn(self.prompt_params(), ids))

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """(N, 77, D) last hidden states in the compute dtype, batches padded to a power of two."""
        ids = tokenize(self.tokenizer, list(texts))
        n = len(ids)
        ids = sharding.pad_rows(ids, sharding.bucket_size(n, minimum=2))
        fn = compiled(_text_function, self.text_encoder, self.mesh)
        out = fn(self.params["text"], sharding.to_global(ids, sharding.replicated(self.mesh)))
        return sharding.to_host(out)[:n]


def place(components, *, dtype=None, mesh: Mesh | None = None, attention_impl: str = "auto") -> PlacedModel:
    """Build the Flax modules of `components` (ip2p_jax.weights.Components) in the compute dtype
    and replicate their params on `mesh` (default: every device, sharding.data_mesh)."""
    c = components
    dtype = dtypes.compute_dtype(dtype)
    mesh = mesh if mesh is not None else sharding.data_mesh()
    vdtype = vae_dtype(dtype, c.vae_config)
    params = {"unet": cast(c.unet_params, dtype), "vae": cast(c.vae_params, vdtype), "text": cast(c.text_params, dtype)}
    sdxl = getattr(c, "text2_config", None) is not None
    if sdxl:
        params["text_2"] = cast(c.text2_params, dtype)
    return PlacedModel(
        unet=UNet2DConditionModel(c.unet_config, dtype=dtype, attention_impl=attention_impl),
        vae=AutoencoderKL(c.vae_config, dtype=vdtype, attention_impl=attention_impl),
        text_encoder=CLIPTextModel(c.text_config, dtype=dtype, attention_impl=attention_impl),
        params=sharding.replicate(params, mesh), tokenizer=c.tokenizer, dtype=dtype, vae_dtype=vdtype, mesh=mesh,
        text_encoder_2=(CLIPTextModelWithProjection(c.text2_config, dtype=dtype, attention_impl=attention_impl)
                        if sdxl else None),
        tokenizer_2=c.tokenizer_2 if sdxl else None)
