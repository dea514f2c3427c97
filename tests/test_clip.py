"""ip2p_jax.models.clip and ip2p_jax.weights.clip against transformers' CLIPTextModel / CLIPModel on the same
perturbed tiny weights."""
import jax
import numpy as np
import pytest

import tiny
from ip2p_jax.models import clip as C
from ip2p_jax.weights import clip as WC
from ip2p_jax.models.config import ConfigError
from ip2p_jax.weights.naming import WeightsError, torch_to_flax
from test_vae import torch_layout, torch_shapes

# Stable Diffusion 1.5 `text_encoder/config.json` (CLIP ViT-L/14 text), as published.
SD15_TEXT_CONFIG = {
    "_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu",
    "hidden_size": 768, "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 3072,
    "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
    "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768,
    "torch_dtype": "float32", "transformers_version": "4.22.0.dev0", "vocab_size": 49408,
}
# The generic keys older transformers wrote into every sub-config of openai/clip-vit-large-patch14.
_GENERIC = {"add_cross_attention": False, "bad_words_ids": None, "chunk_size_feed_forward": 0,
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": False, "is_decoder": False,
            "is_encoder_decoder": False, "length_penalty": 1.0, "max_length": 20, "min_length": 0,
            "no_repeat_ngram_size": 0, "num_beam_groups": 1, "num_beams": 1, "num_return_sequences": 1,
            "output_scores": False, "pruned_heads": {}, "remove_invalid_values": False, "repetition_penalty": 1.0,
            "return_dict": True, "return_dict_in_generate": False, "temperature": 1.0, "tie_encoder_decoder": False,
            "tie_word_embeddings": True, "top_k": 50, "top_p": 1.0, "torchscript": False, "use_bfloat16": False}
VIT_L14_CONFIG = {  # openai/clip-vit-large-patch14 config.json, layout of the published file
    "architectures": ["CLIPModel"], "initializer_factor": 1.0, "logit_scale_init_value": 2.6592,
    "model_type": "clip", "projection_dim": 768,
    "text_config": {**_GENERIC, **SD15_TEXT_CONFIG},
    "text_config_dict": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                         "num_hidden_layers": 12, "projection_dim": 768},
    "vision_config": {**_GENERIC, "attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu",
                      "hidden_size": 1024, "image_size": 224, "initializer_factor": 1.0, "initializer_range": 0.02,
                      "intermediate_size": 4096, "layer_norm_eps": 1e-05, "model_type": "clip_vision_model",
                      "num_attention_heads": 16, "num_channels": 3, "num_hidden_layers": 24, "patch_size": 14,
                      "projection_dim": 768},
    "vision_config_dict": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                           "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768},
}
VOCAB = 100


def _ids(batch, length, eos, seed=0):
    """Random ids with eos in different places: early + padding, mid, last, and (row 3) none at all."""
    ids = np.random.default_rng(seed).integers(0, VOCAB - 2, (batch, length)).astype(np.int32)
    ids[:, 0] = VOCAB - 2
    ids[0, 5:] = eos
    ids[1, length // 2] = eos
    ids[2, -1] = eos
    return ids


@pytest.mark.parametrize("variant", ["quick_gelu", "gelu-legacy-eos"])
def test_text_model_matches_transformers(variant):
    import torch

    ref = tiny.text_encoder(VOCAB, seed=1, hidden_act=variant.split("-")[0])
    if variant.endswith("legacy-eos"):  # SD 1.5's config has eos_token_id=2: pooled at the largest id
        ref.config.eos_token_id = ref.eos_token_id = 2
    cfg = C.CLIPTextConfig.from_dict(ref.config.to_dict(), source="tiny text encoder")
    assert cfg.eos_token_id == ref.eos_token_id
    # transformers >= 5 drops the `text_model.` prefix of SD's files; ours keeps it.
    state = {"text_model." + k: v.numpy() for k, v in ref.state_dict().items()}
    params = torch_to_flax(state, C.abstract_params(cfg), source="tiny text encoder")
    model = C.CLIPTextModel(cfg)
    ids = _ids(4, 77, VOCAB - 1)
    last, pooled = jax.jit(lambda p, i: model.apply({"params": p}, i, return_pooled=True))(params, ids)
    with torch.no_grad():
        out = ref(torch.from_numpy(ids).long())
    np.testing.assert_allclose(last, out.last_hidden_state.numpy(), atol=1e-5)
    np.testing.assert_allclose(pooled, out.pooler_output.numpy(), atol=1e-5)


def test_clip_model_matches_transformers():
    import torch
    import transformers

    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1)
    vision = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8, hidden_act="gelu")
    torch.manual_seed(2)
    ref = tiny.perturb(transformers.CLIPModel(
        transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)), seed=2)
    cfg = C.CLIPConfig.from_dict(ref.config.to_dict(), source="tiny clip")
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    params = WC.params_from_torch(state, C.abstract_params(cfg), source="tiny clip")
    back = WC.params_to_torch(params)
    assert back.keys() == state.keys() and all(np.array_equal(back[k], state[k]) for k in state)

    model = C.CLIPModel(cfg)
    ids = _ids(4, 16, VOCAB - 1)
    pixels = np.random.default_rng(3).normal(size=(4, 32, 32, 3)).astype(np.float32)

    @jax.jit
    def run(p, ids, px):
        v = {"params": p}
        return (model.apply(v, ids, method=model.get_text_features),
                model.apply(v, px, method=model.get_image_features), model.apply(v, ids, px))

    text_f, image_f, out = run(params, ids, pixels)
    with torch.no_grad():
        t_ids, t_px = torch.from_numpy(ids).long(), torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())
        ref_text = ref.get_text_features(t_ids).pooler_output.numpy()
        ref_image = ref.get_image_features(t_px).pooler_output.numpy()
        ref_out = ref(input_ids=t_ids, pixel_values=t_px)
    np.testing.assert_allclose(text_f, ref_text, atol=1e-5)
    np.testing.assert_allclose(image_f, ref_image, atol=1e-5)
    np.testing.assert_allclose(out["logits_per_image"], ref_out.logits_per_image.numpy(), atol=1e-4)
    np.testing.assert_allclose(out["text_embeds"], ref_out.text_embeds.numpy(), atol=1e-5)

    bad = {k: v for k, v in state.items() if k != "vision_model.embeddings.class_embedding"}
    with pytest.raises(WeightsError, match="vision_model.embeddings.class_embedding"):
        WC.params_from_torch(bad, C.abstract_params(cfg), source="clip.safetensors")
    with pytest.raises(ValueError, match="16x16x3"):
        jax.eval_shape(lambda: model.apply({"params": params}, pixels[:, :16, :16], method=model.get_image_features))
    with pytest.raises(ValueError, match="78 tokens"):
        jax.eval_shape(lambda: model.apply({"params": params}, np.zeros((1, 78), np.int32),
                                           method=model.get_text_features))


def test_vit_l14_builds_like_transformers():
    """Full-size CLIP ViT-L/14 (SD 1.5's text encoder, and the metrics' CLIPModel): same names and shapes."""
    import torch
    import transformers

    text_cfg = C.CLIPTextConfig.from_dict(SD15_TEXT_CONFIG)
    clip_cfg = C.CLIPConfig.from_dict(VIT_L14_CONFIG)
    ref_parsed = transformers.CLIPConfig(**VIT_L14_CONFIG)
    for ours, theirs in ((clip_cfg.text_config, ref_parsed.text_config),
                         (clip_cfg.vision_config, ref_parsed.vision_config)):
        for field, value in vars(ours).items():
            assert getattr(theirs, field) == value, field
    with torch.device("meta"):
        ref_text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_cfg.to_dict()))
        ref_clip = transformers.CLIPModel(transformers.CLIPConfig(**clip_cfg.to_dict()))
    assert ref_text.config.eos_token_id == 2 and ref_clip.config.projection_dim == 768

    clip_abstract = C.abstract_params(clip_cfg)
    assert torch_layout(clip_abstract, WC.BARE_PARAMS) == torch_shapes(ref_clip)
    text_layout = torch_layout(C.abstract_params(text_cfg))
    assert text_layout == torch_shapes(ref_text, prefix="text_model.")
    assert sum(int(np.prod(s)) for s in text_layout.values()) == 123_060_480  # SD 1.5 text encoder
    assert sum(x.size for x in jax.tree.leaves(clip_abstract)) == sum(p.numel() for p in ref_clip.parameters())


def test_activations_match_transformers():
    import torch
    from transformers.activations import ACT2FN

    x = np.linspace(-6, 6, 101, dtype=np.float32)
    for name, fn in C.ACTIVATIONS.items():
        np.testing.assert_allclose(fn(x), ACT2FN[name](torch.from_numpy(x)).numpy(), atol=1e-6, err_msg=name)


def test_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match=r"te/config.json.*position_embedding_type='rotary'"):
        C.CLIPTextConfig.from_dict({**SD15_TEXT_CONFIG, "position_embedding_type": "rotary"},
                                   source="te/config.json")
    with pytest.raises(ConfigError, match="hidden_act='relu2'"):
        C.CLIPTextConfig.from_dict({**SD15_TEXT_CONFIG, "hidden_act": "relu2"})
    with pytest.raises(ConfigError, match="eos_token_id"):
        C.CLIPTextConfig.from_dict({**SD15_TEXT_CONFIG, "eos_token_id": [2, 3]})
    with pytest.raises(ConfigError, match=r"vision_config.*pruned_heads"):
        C.CLIPConfig.from_dict({**VIT_L14_CONFIG, "vision_config_dict": {"pruned_heads": {"0": [1]}}})
