"""SDXL's networks against the references on perturbed random weights: the text_time UNet
(diffusers UNet2DConditionModel) and the second text encoder (transformers
CLIPTextModelWithProjection), plus the penultimate hidden states SDXL conditions on."""
from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

import tiny
from ip2p_jax.models import clip as C
from ip2p_jax.models.config import ConfigError
from ip2p_jax.models.unet import UNet2DConditionModel, UNetConfig, abstract_params
from ip2p_jax.weights.naming import torch_to_flax
from test_unet import FAST_COMPILE, rel_err

VOCAB = 100


def _unet_case(seed=2):
    m = tiny.sdxl_unet(8, seed=seed, text_dims=(32, 16))
    cfg = UNetConfig.from_dict(dict(m.config))
    params = torch_to_flax({k: v.numpy() for k, v in m.state_dict().items()}, abstract_params(cfg), source="sdxl")
    return m, cfg, params


def _unet_inputs(cfg, batch, hw, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *hw, cfg.in_channels)).astype(np.float32)
    t = rng.integers(0, 1000, batch)
    ctx = rng.standard_normal((batch, 7, cfg.cross_attention_dim)).astype(np.float32)
    pooled = rng.standard_normal((batch, cfg.pooled_dim)).astype(np.float32)
    time_ids = np.array([[24, 40, 0, 0, 24, 40], [512, 768, 8, 16, 1024, 1024]][:batch], np.float32)
    return x, t, ctx, pooled, time_ids


def _torch_unet(m, x, t, ctx, pooled, time_ids):
    with torch.no_grad():
        out = m(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.as_tensor(t), torch.from_numpy(ctx),
                added_cond_kwargs={"text_embeds": torch.from_numpy(pooled), "time_ids": torch.from_numpy(time_ids)})
    return out.sample.numpy().transpose(0, 2, 3, 1)


def test_text_time_unet_matches_diffusers():
    m, cfg, params = _unet_case()
    assert cfg.text_time and cfg.pooled_dim == tiny.SDXL_PROJECTION
    assert cfg.down_stages()[1].transformer_layers == 2 and not cfg.down_stages()[0].attention
    x, t, ctx, pooled, time_ids = _unet_inputs(cfg, 2, (6, 10))   # non-square, odd after one downsample
    model = UNet2DConditionModel(cfg, attention_impl="xla")
    run = jax.jit(lambda p, *a: model.apply({"params": p}, *a[:3], text_embeds=a[3], time_ids=a[4]),
                  compiler_options=FAST_COMPILE)
    want = _torch_unet(m, x, t, ctx, pooled, time_ids)
    got = np.asarray(run(params, x, t, ctx, pooled, time_ids))
    assert rel_err(got, want) < 1e-4
    # negative controls: the pooled embedding and the time ids both reach the output
    other_ids = time_ids.copy()
    other_ids[:, 2] += 64
    for changed in (run(params, x, t, ctx, pooled * 0.0, time_ids), run(params, x, t, ctx, pooled, other_ids)):
        assert rel_err(changed, want) > 1e-3
    # the config round-trips to one diffusers accepts, with the same parameter names
    assert dict(type(m).from_config(cfg.to_dict()).config)["addition_embed_type"] == "text_time"


def test_text_time_unet_needs_its_inputs_and_a_consistent_config():
    m, cfg, params = _unet_case()
    x, t, ctx, _, _ = _unet_inputs(cfg, 1, (8, 8))
    with pytest.raises(ConfigError, match="text_embeds"):
        UNet2DConditionModel(cfg).apply({"params": params}, x, t, ctx)
    with pytest.raises(ConfigError, match="addition_time_embed_dim"):
        UNetConfig.from_dict({**dict(m.config), "addition_time_embed_dim": None})
    with pytest.raises(ConfigError, match="addition_embed_type"):
        UNetConfig.from_dict({**dict(m.config), "addition_embed_type": "text_image"})


def _ids(batch, length, eos, pad, seed=0):
    ids = np.random.default_rng(seed).integers(1, VOCAB - 2, (batch, length)).astype(np.int32)
    ids[:, 0] = VOCAB - 2
    ids[0, 5] = eos
    ids[0, 6:] = pad
    ids[1, length // 2] = eos
    ids[2, -1] = eos
    return ids


@pytest.mark.parametrize("layers", [3, 1])
def test_projection_text_encoder_matches_transformers(layers):
    ref = tiny.text_encoder_2(VOCAB, seed=4, layers=layers)
    cfg = C.CLIPTextConfig.from_dict(ref.config.to_dict(), source="tiny text encoder 2")
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    params = torch_to_flax(state, C.abstract_params(cfg, projection=True), source="tiny text encoder 2")
    assert "text_projection" in params and "bias" not in params["text_projection"]
    model = C.CLIPTextModelWithProjection(cfg)
    ids = _ids(3, 77, VOCAB - 1, 0)
    run = jax.jit(lambda p, i, pen: model.apply({"params": p}, i, penultimate=pen), static_argnums=2)
    (pen, embeds), (last, _) = run(params, ids, True), run(params, ids, False)
    with torch.no_grad():
        out = ref(torch.from_numpy(ids).long(), output_hidden_states=True)
    scale = lambda a: float(np.abs(a).max())  # noqa: E731
    for got, want in ((embeds, out.text_embeds), (pen, out.hidden_states[-2]), (last, out.last_hidden_state)):
        want = want.numpy()
        assert np.abs(np.asarray(got) - want).max() <= 1e-4 * scale(want)
    # negative control: the penultimate states are not the final ones (no final layer norm)
    assert np.abs(np.asarray(pen) - out.last_hidden_state.numpy()).max() > 1e-2


def test_text_encoder_penultimate_matches_transformers():
    ref = tiny.text_encoder(VOCAB, seed=5)
    cfg = C.CLIPTextConfig.from_dict(ref.config.to_dict(), source="tiny text encoder")
    state = {"text_model." + k: v.numpy() for k, v in ref.state_dict().items()}
    params = torch_to_flax(state, C.abstract_params(cfg), source="tiny text encoder")
    ids = _ids(3, 77, VOCAB - 1, VOCAB - 1)
    pen = C.CLIPTextModel(cfg).apply({"params": params}, ids, penultimate=True)
    with torch.no_grad():
        out = ref(torch.from_numpy(ids).long(), output_hidden_states=True)
    np.testing.assert_allclose(pen, out.hidden_states[-2].numpy(), atol=1e-5)
    assert np.abs(np.asarray(pen) - out.last_hidden_state.numpy()).max() > 1e-2
