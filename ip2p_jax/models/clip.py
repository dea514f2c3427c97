"""CLIP in Flax: the text encoder (transformers `CLIPTextModel`), the vision tower and `CLIPModel`.

Param paths mirror the PyTorch state-dict names of Stable Diffusion's `text_encoder` files and of
transformers' `CLIPModel`: `text_model.embeddings.token_embedding`, `text_model.encoder.layers_i.
self_attn.q_proj`, ..., `vision_model.pre_layrnorm` (sic), `text_projection`, `visual_projection`.
Two PyTorch parameters are bare `nn.Parameter`s without a `.weight` leaf
(`vision_model.embeddings.class_embedding`, `logit_scale`); ip2p_jax.weights.clip converts them
beside the generic table of ip2p_jax.weights.naming.
Note: transformers >= 5 saves a lone CLIPTextModel without the `text_model.` prefix; SD folders
(and CLIPModel files) have it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from ip2p_jax.models import config as config_lib
from ip2p_jax.models.config import ConfigError
from ip2p_jax.models.layers import attention

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}

# Keys older transformers wrote into every config.json that cannot change an inference forward
# pass: generation settings, init scales, dropout (never applied here, as in torch eval()).
_IRRELEVANT_KEYS = frozenset({
    "attention_dropout", "dropout", "initializer_range", "initializer_factor", "add_cross_attention",
    "bad_words_ids", "begin_suppress_tokens", "chunk_size_feed_forward", "cross_attention_hidden_size",
    "decoder_start_token_id", "diversity_penalty", "do_sample", "early_stopping",
    "encoder_no_repeat_ngram_size", "exponential_decay_length_penalty", "finetuning_task",
    "forced_bos_token_id", "forced_eos_token_id", "is_decoder", "is_encoder_decoder", "length_penalty",
    "max_length", "min_length", "no_repeat_ngram_size", "num_beam_groups", "num_beams",
    "num_return_sequences", "output_scores", "prefix", "problem_type", "remove_invalid_values",
    "repetition_penalty", "return_dict_in_generate", "sep_token_id", "suppress_tokens",
    "task_specific_params", "temperature", "tf_legacy_loss", "tie_encoder_decoder", "tie_word_embeddings",
    "tokenizer_class", "top_k", "top_p", "torchscript", "typical_p", "use_bfloat16",
})
_ACCEPTED_DEFAULTS = {"pruned_heads": {}}

def _parse(cls, d: Mapping[str, Any], source: str):
    d = {k: v for k, v in d.items() if k not in _IRRELEVANT_KEYS}
    try:
        return config_lib.from_dict(cls, d, source=source, accepted_defaults=_ACCEPTED_DEFAULTS)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(source) else f"{source}: {msg}") from None


def _check_common(cfg, name: str) -> None:
    problems = []
    if cfg.hidden_size % cfg.num_attention_heads:
        problems.append(f"hidden_size={cfg.hidden_size} not divisible by num_attention_heads="
                        f"{cfg.num_attention_heads}")
    if cfg.hidden_act not in ACTIVATIONS:
        problems.append(f"hidden_act={cfg.hidden_act!r} (supported: {sorted(ACTIVATIONS)})")
    if problems:
        raise ConfigError(f"{name}: unsupported " + "; ".join(problems))


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """transformers CLIPTextConfig; field names and defaults are transformers' own."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: Optional[int] = 1
    bos_token_id: Optional[int] = 49406
    eos_token_id: int = 49407

    def __post_init__(self):
        _check_common(self, "CLIPTextConfig")
        if not isinstance(self.eos_token_id, int):
            raise ConfigError(f"CLIPTextConfig: eos_token_id must be one int, got {self.eos_token_id!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "text encoder config") -> "CLIPTextConfig":
        return _parse(cls, d, source)

    def to_dict(self) -> dict:
        """A dict transformers' `CLIPTextConfig(**d)` accepts."""
        return {"model_type": "clip_text_model", **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """transformers CLIPVisionConfig (square images, int sizes)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        _check_common(self, "CLIPVisionConfig")
        if not (isinstance(self.image_size, int) and isinstance(self.patch_size, int)):
            raise ConfigError(f"CLIPVisionConfig: image_size and patch_size must be ints, got "
                              f"{self.image_size!r}, {self.patch_size!r}")

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "vision config") -> "CLIPVisionConfig":
        return _parse(cls, d, source)

    def to_dict(self) -> dict:
        return {"model_type": "clip_vision_model", **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """transformers CLIPConfig: both towers and the shared projection size."""

    text_config: CLIPTextConfig = CLIPTextConfig()
    vision_config: CLIPVisionConfig = CLIPVisionConfig()
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "clip config") -> "CLIPConfig":
        d = dict(d)
        towers = {}
        for name, sub_cls in (("text_config", CLIPTextConfig), ("vision_config", CLIPVisionConfig)):
            # Old files also carry `<tower>_dict`; transformers rebuilds the tower from it alone.
            sub, legacy = d.pop(name, None), d.pop(f"{name}_dict", None)
            sub = legacy or sub or {}
            towers[name] = sub_cls.from_dict(sub, source=f"{source} {name}")
        base = _parse(cls, d, source)
        return dataclasses.replace(base, **towers)

    def to_dict(self) -> dict:
        """A dict transformers' `CLIPConfig(**d)` accepts."""
        return {"model_type": "clip", "text_config": self.text_config.to_dict(),
                "vision_config": self.vision_config.to_dict(), "projection_dim": self.projection_dim,
                "logit_scale_init_value": self.logit_scale_init_value}


# ----------------------------------------------------------------------------- modules

def _layer_norm(eps: float, dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32, use_fast_variance=False, name=name)


class CLIPAttention(nn.Module):
    num_heads: int
    causal: bool
    dtype: Any = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        b, n, d = x.shape
        heads = lambda t: t.reshape(b, n, self.num_heads, d // self.num_heads)
        q, k, v = (heads(nn.Dense(d, dtype=self.dtype, name=f"{p}_proj")(x)) for p in "qkv")
        o = attention(q, k, v, impl=self.attention_impl, causal=self.causal).reshape(b, n, d)
        return nn.Dense(d, dtype=self.dtype, name="out_proj")(o)


class CLIPMLP(nn.Module):
    intermediate_size: int
    hidden_act: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = ACTIVATIONS[self.hidden_act](nn.Dense(self.intermediate_size, dtype=self.dtype, name="fc1")(x))
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(h)


class CLIPEncoder(nn.Module):
    """Pre-norm transformer layers `layers_i` (self_attn, layer_norm1, mlp, layer_norm2)."""

    config: Any  # CLIPTextConfig or CLIPVisionConfig
    causal: bool
    dtype: Any = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x, return_penultimate: bool = False):
        """-> the last layer's output; with return_penultimate also the one before it (transformers'
        hidden_states[-2]: the embeddings when there is a single layer)."""
        cfg = self.config
        penultimate = x
        for i in range(cfg.num_hidden_layers):
            penultimate = x
            x = _EncoderLayer(cfg, self.causal, self.dtype, self.attention_impl, name=f"layers_{i}")(x)
        return (x, penultimate) if return_penultimate else x


class _EncoderLayer(nn.Module):
    config: Any
    causal: bool
    dtype: Any = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        cfg, dt = self.config, self.dtype
        h = _layer_norm(cfg.layer_norm_eps, dt, "layer_norm1")(x)
        x = x + CLIPAttention(cfg.num_attention_heads, self.causal, dt, self.attention_impl, name="self_attn")(h)
        h = _layer_norm(cfg.layer_norm_eps, dt, "layer_norm2")(x)
        return x + CLIPMLP(cfg.intermediate_size, cfg.hidden_act, dt, name="mlp")(h)


def pool_eos(hidden, input_ids, eos_token_id: int):
    """transformers' pooled text output: the hidden state at the first eos token. With the legacy
    eos_token_id == 2 (e.g. SD 1.5's config) transformers takes the position of the largest id."""
    ids = jnp.asarray(input_ids, jnp.int32)
    idx = jnp.argmax(ids if eos_token_id == 2 else (ids == eos_token_id).astype(jnp.int32), axis=-1)
    return jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]


class CLIPTextTransformer(nn.Module):
    """embeddings, causal encoder, final_layer_norm -> (last_hidden_state, pooled); with
    return_penultimate also the penultimate layer's output (no final layer norm), as a third value."""

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, input_ids, return_penultimate: bool = False):
        cfg = self.config
        n = input_ids.shape[-1]
        if n > cfg.max_position_embeddings:
            raise ValueError(f"CLIP text input has {n} tokens; the model takes at most "
                             f"{cfg.max_position_embeddings}")
        x = _TextEmbeddings(cfg, self.dtype, name="embeddings")(input_ids)
        x, penultimate = CLIPEncoder(cfg, True, self.dtype, self.attention_impl, name="encoder")(x, True)
        x = _layer_norm(cfg.layer_norm_eps, self.dtype, "final_layer_norm")(x)
        pooled = pool_eos(x, input_ids, cfg.eos_token_id)
        return (x, pooled, penultimate) if return_penultimate else (x, pooled)


def _embed(num: int, dim: int, dtype, name: str) -> nn.Embed:
    return nn.Embed(num, dim, dtype=dtype, embedding_init=nn.initializers.normal(0.02), name=name)


class _TextEmbeddings(nn.Module):
    """token_embedding(ids) + position_embedding(0..n-1)."""

    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        cfg = self.config
        tok = _embed(cfg.vocab_size, cfg.hidden_size, self.dtype, "token_embedding")(input_ids)
        pos = _embed(cfg.max_position_embeddings, cfg.hidden_size, self.dtype, "position_embedding")(
            jnp.arange(input_ids.shape[-1]))
        return tok + pos[None]


class CLIPVisionTransformer(nn.Module):
    """Patch + class + position embeddings, pre_layrnorm, encoder; pooled = post_layernorm(class token)."""

    config: CLIPVisionConfig
    dtype: Any = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, pixel_values):
        cfg = self.config
        x = _VisionEmbeddings(cfg, self.dtype, name="embeddings")(pixel_values)
        x = _layer_norm(cfg.layer_norm_eps, self.dtype, "pre_layrnorm")(x)
        x = CLIPEncoder(cfg, False, self.dtype, self.attention_impl, name="encoder")(x)
        pooled = _layer_norm(cfg.layer_norm_eps, self.dtype, "post_layernorm")(x[:, 0])
        return x, pooled


class _VisionEmbeddings(nn.Module):
    config: CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        cfg, d = self.config, self.config.hidden_size
        b, h, w, c = pixel_values.shape
        if (h, w, c) != (cfg.image_size, cfg.image_size, cfg.num_channels):
            raise ValueError(f"CLIP vision input is {h}x{w}x{c} (NHWC); the model takes "
                             f"{cfg.image_size}x{cfg.image_size}x{cfg.num_channels}")
        p = cfg.patch_size
        patches = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=self.dtype,
                          name="patch_embedding")(pixel_values)
        patches = patches.reshape(b, -1, d)
        cls = self.param("class_embedding", nn.initializers.normal(d ** -0.5), (d,), jnp.float32)
        cls = jnp.broadcast_to(cls.astype(patches.dtype), (b, 1, d))
        pos = _embed(cfg.num_positions, d, self.dtype, "position_embedding")(jnp.arange(cfg.num_positions))
        return jnp.concatenate([cls, patches], axis=1) + pos[None]


class CLIPTextModel(nn.Module):
    """transformers CLIPTextModel. input_ids (B, L<=77) int -> last_hidden_state (B, L, D), after the
    final layer norm (what Stable Diffusion conditions on); `return_pooled=True` also returns the
    pooled (eos-token) output (B, D). Outputs are in the compute dtype."""

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, input_ids, return_pooled: bool = False, penultimate: bool = False):
        """penultimate=True: the first output is the penultimate layer's hidden states instead
        (transformers' hidden_states[-2], without the final layer norm: what SDXL conditions on)."""
        last, pooled, before = CLIPTextTransformer(self.config, self.dtype, self.attention_impl, name="text_model")(
            input_ids, True)
        hidden = before if penultimate else last
        return (hidden, pooled) if return_pooled else hidden


class CLIPTextModelWithProjection(nn.Module):
    """transformers CLIPTextModelWithProjection (SDXL's second text encoder): input_ids (B, L) ->
    (hidden states (B, L, D), text_embeds (B, projection_dim)); text_embeds is the bias-free
    text_projection of the pooled (eos-token) output. Hidden states are the last layer's after the
    final layer norm, or with penultimate=True the penultimate layer's without it."""

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, input_ids, penultimate: bool = False):
        last, pooled, before = CLIPTextTransformer(self.config, self.dtype, self.attention_impl, name="text_model")(
            input_ids, True)
        embeds = nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype, name="text_projection")(pooled)
        return (before if penultimate else last), embeds


class CLIPModel(nn.Module):
    """transformers CLIPModel: text and vision towers with bias-free projections. Features are fp32."""

    config: CLIPConfig
    dtype: Any = jnp.float32
    attention_impl: str = "auto"

    def setup(self):
        cfg = self.config
        self.text_model = CLIPTextTransformer(cfg.text_config, self.dtype, self.attention_impl)
        self.vision_model = CLIPVisionTransformer(cfg.vision_config, self.dtype, self.attention_impl)
        self.text_projection = nn.Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype)
        self.visual_projection = nn.Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(cfg.logit_scale_init_value), (),
                                      jnp.float32)

    def get_text_features(self, input_ids):
        """input_ids (B, L) -> projected pooled text features (B, projection_dim), not normalised."""
        _, pooled = self.text_model(input_ids)
        return self.text_projection(pooled).astype(jnp.float32)

    def get_image_features(self, pixel_values):
        """pixel_values (B, S, S, 3) NHWC, already resized and CLIP-normalised -> (B, projection_dim)."""
        _, pooled = self.vision_model(pixel_values)
        return self.visual_projection(pooled).astype(jnp.float32)

    def __call__(self, input_ids, pixel_values):
        """As transformers' forward: unit-norm embeddings and logit_scale.exp()-scaled cosine logits."""
        text = _unit(self.get_text_features(input_ids))
        image = _unit(self.get_image_features(pixel_values))
        logits_per_text = jnp.exp(self.logit_scale) * text @ image.T
        return {"text_embeds": text, "image_embeds": image, "logits_per_text": logits_per_text,
                "logits_per_image": logits_per_text.T}


def _unit(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def abstract_params(config, dtype=jnp.float32, *, projection: bool = False):
    """Params pytree of jax.ShapeDtypeStruct for a CLIPTextConfig (CLIPTextModel, or with
    projection=True CLIPTextModelWithProjection) or a CLIPConfig (CLIPModel); nothing is allocated
    or computed."""
    key = jax.random.key(0)
    if isinstance(config, CLIPTextConfig):
        model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config, dtype)
        ids = jax.ShapeDtypeStruct((1, config.max_position_embeddings), jnp.int32)
        return jax.eval_shape(lambda k, i: model.init(k, i)["params"], key, ids)
    if isinstance(config, CLIPConfig):
        model = CLIPModel(config, dtype)
        v = config.vision_config
        ids = jax.ShapeDtypeStruct((1, config.text_config.max_position_embeddings), jnp.int32)
        px = jax.ShapeDtypeStruct((1, v.image_size, v.image_size, v.num_channels), jnp.float32)
        return jax.eval_shape(lambda k, i, p: model.init(k, i, p)["params"], key, ids, px)
    raise TypeError(f"abstract_params takes a CLIPTextConfig or CLIPConfig, got {type(config).__name__}")
