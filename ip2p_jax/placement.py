"""Putting a model on devices, one way for every user of a model.

    model = place(components, dtype="bf16")            # Flax modules + params replicated on the mesh
    emb = model.encode_text(["make it winter", ""])    # (N, 77, D) host numpy

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
from ip2p_jax.models.clip import CLIPTextModel
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
    return jax.jit(lambda p, ids: text_encoder.apply({"params": p}, ids), out_shardings=sharding.replicated(mesh))


@dataclasses.dataclass
class PlacedModel:
    """A Stable Diffusion / InstructPix2Pix model on a ('data',) mesh.

    params: {"unet", "vae", "text"} replicated pytrees (the VAE's in `vae_dtype`, the rest in
    `dtype`); callers may replace entries (the training sampler swaps in new EMA weights).
    """
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    params: dict
    tokenizer: Any
    dtype: jnp.dtype
    vae_dtype: jnp.dtype
    mesh: Mesh

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
    return PlacedModel(
        unet=UNet2DConditionModel(c.unet_config, dtype=dtype, attention_impl=attention_impl),
        vae=AutoencoderKL(c.vae_config, dtype=vdtype, attention_impl=attention_impl),
        text_encoder=CLIPTextModel(c.text_config, dtype=dtype, attention_impl=attention_impl),
        params=sharding.replicate(params, mesh), tokenizer=c.tokenizer, dtype=dtype, vae_dtype=vdtype, mesh=mesh)
