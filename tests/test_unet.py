"""The Flax UNet against diffusers' UNet2DConditionModel on the same perturbed random weights."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet

import tiny
from ip2p_jax.models.config import ConfigError
from ip2p_jax.models.unet import UNet2DConditionModel, UNetConfig, abstract_params, step_embeddings
from ip2p_jax.weights.naming import torch_to_flax

SD15_IP2P = dict(
    sample_size=64, in_channels=8, out_channels=4, layers_per_block=2,
    block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768, attention_head_dim=8,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
)
SD21 = dict(SD15_IP2P, sample_size=96, in_channels=4, cross_attention_dim=1024,
            attention_head_dim=[5, 10, 20, 20], use_linear_projection=True, upcast_attention=True)


def three_level_sd2(seed: int = 1):
    """SD2-style (linear projection, per-block heads, upcast) with 3 levels and 2 transformer layers
    in the middle level, so odd sizes exercise the upsample-size path twice."""
    torch.manual_seed(seed)
    m = TorchUNet(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32, 32),
                  norm_num_groups=8, cross_attention_dim=24, attention_head_dim=(2, 4, 4),
                  transformer_layers_per_block=(1, 2, 1), use_linear_projection=True, upcast_attention=True,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    return tiny.perturb(m, seed=seed)


REFERENCES = {"sd1_in8": lambda: tiny.unet(8), "sd2_3level": three_level_sd2}
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # halves XLA:CPU compile time of these tiny models


@functools.cache
def reference(name):
    """(torch model, config, params) for one reference model."""
    m = REFERENCES[name]()
    cfg = UNetConfig.from_dict(dict(m.config))
    state = {k: v.numpy() for k, v in m.state_dict().items()}
    params = torch_to_flax(state, abstract_params(cfg), source=name)
    return m, cfg, params


@functools.cache
def jitted(cfg, dtype=jnp.float32):
    model = UNet2DConditionModel(cfg, dtype=dtype, attention_impl="xla")
    return jax.jit(model.apply, compiler_options=FAST_COMPILE)


def inputs(cfg, batch, hw, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *hw, cfg.in_channels)).astype(np.float32)
    t = rng.integers(0, 1000, batch)
    ctx = rng.standard_normal((batch, 7, cfg.cross_attention_dim)).astype(np.float32)
    return x, t, ctx


def torch_forward(m, x, t, ctx):
    with torch.no_grad():
        out = m(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.as_tensor(t), torch.from_numpy(ctx)).sample
    return out.numpy().transpose(0, 2, 3, 1)


def rel_err(a, ref):
    return float(np.abs(np.asarray(a, np.float32) - ref).max() / np.abs(ref).max())


SD1_CASE = ("sd1_in8", 3, (8, 12))  # shared by the parity, self-attention-source and bf16 tests


def test_sd1_in8_matches_diffusers():
    """SD1-style, 8 input channels, non-square, per-example timesteps."""
    name, batch, hw = SD1_CASE
    m, cfg, params = reference(name)
    x, t, ctx = inputs(cfg, batch, hw)
    out = jitted(cfg)({"params": params}, x, t, ctx)
    ref = torch_forward(m, x, t, ctx)
    assert out.shape == ref.shape == (batch, *hw, 4)
    assert rel_err(out, ref) <= 1e-4


def test_precomputed_step_embeddings_equal_diffusers():
    """step_embeddings for a plan's timesteps, row i passed as temb=, gives the UNet's output at
    timestep i (diffusers' forward); the wrong step's row does not (negative control)."""
    name, batch, hw = SD1_CASE
    m, cfg, params = reference(name)
    x, _, ctx = inputs(cfg, batch, hw)
    model = UNet2DConditionModel(cfg, attention_impl="xla")
    timesteps = np.asarray([999.0, 712.5, 40.0], np.float32)
    table = step_embeddings(model, params, timesteps)
    assert table.shape == (3, 4 * cfg.block_out_channels[0])
    run = jax.jit(lambda p, x, ctx, temb: model.apply({"params": p}, x, None, ctx, temb=temb),
                  compiler_options=FAST_COMPILE)
    for i in (0, 2):
        ref = torch_forward(m, x, np.full(batch, timesteps[i]), ctx)
        assert rel_err(run(params, x, ctx, table[i][None]), ref) <= 1e-4
    ref = torch_forward(m, x, np.full(batch, timesteps[0]), ctx)
    assert rel_err(run(params, x, ctx, table[2][None]), ref) > 1e-2


def test_sd2_odd_size_matches_diffusers():
    """SD2-style, 4 input channels, 3 levels, odd non-square size (11 -> 6 -> 3 -> 6 -> 11 and
    6 -> 3 -> 2 -> 3 -> 6: the upsamplers must take the skips' sizes), one scalar timestep."""
    m, cfg, params = reference("sd2_3level")
    assert cfg.use_linear_projection and cfg.upcast_attention and cfg.attention_head_dim == (2, 4, 4)
    x, _, ctx = inputs(cfg, 2, (11, 6), seed=1)
    out = jitted(cfg)({"params": params}, x, 321, ctx)
    ref = torch_forward(m, x, 321, ctx)
    assert out.shape == ref.shape == (2, 11, 6, 4)
    assert rel_err(out, ref) <= 1e-4


class InjectSelfAttentionProbs:
    """diffusers attention processor: row b uses the softmax probabilities of row source[b]."""

    def __init__(self, source):
        self.source = torch.as_tensor(source)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        assert encoder_hidden_states is None  # only installed on attn1 (self-attention)
        q, k, v = (attn.head_to_batch_dim(f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
        probs = attn.get_attention_scores(q, k)
        b = hidden_states.shape[0]
        probs = probs.view(b, attn.heads, *probs.shape[1:])[self.source].flatten(0, 1)
        return attn.to_out[0](attn.batch_to_head_dim(torch.bmm(probs, v)))


def test_self_attn_source():
    name, batch, hw = SD1_CASE
    m, cfg, params = reference(name)
    x, t, ctx = inputs(cfg, batch, hw)
    plain = np.asarray(jitted(cfg)({"params": params}, x, t, ctx))
    apply = jitted(cfg)
    identity = np.asarray(apply({"params": params}, x, t, ctx, jnp.arange(3)))
    np.testing.assert_allclose(identity, plain, rtol=0, atol=1e-6)

    source = np.array([0, 2, 1])
    swapped = np.asarray(apply({"params": params}, x, t, ctx, source))
    np.testing.assert_allclose(swapped[0], plain[0], rtol=0, atol=1e-6)  # row 0 keeps its own maps
    assert rel_err(swapped[1:], plain[1:]) > 1e-2                        # rows 1, 2 take each other's

    processors = {name: InjectSelfAttentionProbs(source) if name.endswith("attn1.processor") else proc
                  for name, proc in m.attn_processors.items()}
    saved = dict(m.attn_processors)
    m.set_attn_processor(processors)
    try:
        ref = torch_forward(m, x, t, ctx)
    finally:
        m.set_attn_processor(saved)
    assert rel_err(swapped, ref) <= 1e-4


def test_bf16_close_to_fp32():
    name, batch, hw = SD1_CASE
    m, cfg, params = reference(name)
    x, t, ctx = inputs(cfg, batch, hw)
    fp32 = np.asarray(jitted(cfg)({"params": params}, x, t, ctx))
    bf16 = jitted(cfg, jnp.bfloat16)({"params": params}, x, t, ctx)
    assert bf16.dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(bf16, np.float32)).all()
    assert rel_err(bf16, fp32) < 5e-2


@pytest.mark.slow
def test_remat_gradients_equal():
    _, cfg, params = reference("sd1_in8")
    x, t, ctx = inputs(cfg, 2, (8, 8))

    def grads(remat):
        model = UNet2DConditionModel(cfg, attention_impl="xla", remat=remat)
        loss = lambda p: jnp.mean(model.apply({"params": p}, x, t, ctx) ** 2)  # noqa: E731
        return jax.jit(jax.grad(loss))(params)

    base = grads("none")
    for policy in ("dots", "full", True):
        for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(grads(policy))):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_remat_policies_reach_the_backward_pass():
    """Each policy is what the traced gradient holds: no remat, remat with the dots policy, or remat
    saving nothing (a misspelt policy is an error, not silently none)."""
    _, cfg, params = reference("sd1_in8")
    x, t, ctx = inputs(cfg, 1, (8, 8))

    def traced(remat):
        model = UNet2DConditionModel(cfg, attention_impl="xla", remat=remat)
        return str(jax.make_jaxpr(jax.grad(lambda p: jnp.mean(model.apply({"params": p}, x, t, ctx) ** 2)))(params))

    none, dots, full = traced(False), traced("dots"), traced("full")
    assert "remat" not in none and "remat" in dots and "remat" in full
    assert "only_if_no_batch_dims=True" in dots and "only_if_no_batch_dims" not in full
    with pytest.raises(ConfigError, match="one of none, dots, full"):
        UNet2DConditionModel(cfg, remat="dot").apply({"params": params}, x, t, ctx)


def count(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("cfg_dict", [SD15_IP2P, SD21], ids=["sd15_ip2p", "sd21"])
def test_full_size_param_count_and_config(cfg_dict):
    with torch.device("meta"):
        m = TorchUNet(**cfg_dict)
    cfg = UNetConfig.from_dict(dict(m.config))   # every key diffusers writes, at its value
    assert cfg == UNetConfig.from_dict(cfg_dict)
    assert count(abstract_params(cfg)) == sum(p.numel() for p in m.parameters())


def test_config_rejects_unknown_and_unsupported():
    with pytest.raises(ConfigError, match="frobnicate"):
        UNetConfig.from_dict(dict(SD15_IP2P, frobnicate=3))
    with pytest.raises(ConfigError, match="class_embed_type"):
        UNetConfig.from_dict(dict(SD15_IP2P, class_embed_type="timestep"))
    with pytest.raises(ConfigError, match="AttnDownBlock2D"):
        UNetConfig.from_dict(dict(SD15_IP2P, down_block_types=["AttnDownBlock2D"] * 4))
    with pytest.raises(ConfigError, match="attention_head_dim"):
        UNetConfig.from_dict(dict(SD15_IP2P, attention_head_dim=[8, 8]))
    # accepted at their off values
    UNetConfig.from_dict(dict(SD15_IP2P, dual_cross_attention=False, num_class_embeds=None, _diffusers_version="0.8"))


def test_to_dict_round_trips_through_diffusers():
    cfg = UNetConfig.from_dict(SD21)
    d = cfg.to_dict()
    assert d["_class_name"] == "UNet2DConditionModel"
    with torch.device("meta"):
        m = TorchUNet.from_config(d)
    assert UNetConfig.from_dict(dict(m.config)) == cfg
