"""ip2p_jax.models.vae against diffusers' AutoencoderKL on the same perturbed tiny weights."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import tiny
from ip2p_jax.models import vae as V
from ip2p_jax.models.config import ConfigError
from ip2p_jax.weights.naming import flax_path_to_torch_key, torch_to_flax

# stabilityai/sd-vae / runwayml SD 1.5 `vae/config.json`, as published.
SD15_VAE_CONFIG = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "out_channels": 3, "sample_size": 512,
}
# Keys newer diffusers add when saving the same model.
NEWER_KEYS = {"scaling_factor": 0.18215, "shift_factor": None, "latents_mean": None, "latents_std": None,
              "force_upcast": True, "use_quant_conv": True, "use_post_quant_conv": True,
              "mid_block_add_attention": True, "_diffusers_version": "0.42.1"}


def torch_layout(abstract, bare=()):
    """{PyTorch state-dict key: PyTorch shape} that Flax abstract params convert to."""
    out = {}
    for path, leaf in traverse_util.flatten_dict(dict(abstract)).items():
        shape = tuple(leaf.shape)
        if path[-1] in bare:
            out[".".join(path)] = shape
            continue
        if path[-1] == "kernel":
            shape = tuple(shape[i] for i in (3, 2, 0, 1)) if len(shape) == 4 else shape[::-1]
        out[flax_path_to_torch_key(path)] = shape
    return out


def torch_shapes(module, prefix=""):
    return {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def pair():
    """(reference, Flax model, params); logvar biases pushed past both clamp limits."""
    import torch

    ref = tiny.vae(seed=3)
    with torch.no_grad():  # quant_conv channels 4..7 are logvar: exercise the [-30, 20] clamp
        ref.quant_conv.bias[4:] += torch.tensor([35.0, -45.0, 0.0, 0.0])
    cfg = V.VAEConfig.from_dict(dict(ref.config), source="tiny vae")
    params = torch_to_flax({k: v.numpy() for k, v in ref.state_dict().items()}, V.abstract_params(cfg),
                           source="tiny vae")
    return ref, V.AutoencoderKL(cfg), params


def _nchw(a):
    return np.asarray(a).transpose(0, 3, 1, 2)


def _close(ours, theirs, what):
    theirs = theirs.numpy()
    err = np.abs(_nchw(ours) - theirs).max() / max(1.0, np.abs(theirs).max())
    assert err <= 1e-4, f"{what}: max error {err:.2e} relative to output scale"


@pytest.mark.parametrize("shape", [(1, 32, 32), (2, 24, 40)], ids=["square", "non-square"])
def test_matches_diffusers(pair, shape):
    import torch

    ref, model, params = pair
    x = np.random.default_rng(shape[1]).uniform(-1, 1, (*shape, 3)).astype(np.float32)

    @jax.jit
    def run(p, x):
        mean, logvar = model.apply({"params": p}, x, method=model.encode)
        return mean, logvar, model.apply({"params": p}, V.posterior_mode(mean, logvar), method=model.decode)

    mean, logvar, image = run(params, x)
    with torch.no_grad():
        post = ref.encode(torch.from_numpy(_nchw(x).copy())).latent_dist
        decoded = ref.decode(post.mode()).sample
    assert mean.shape == (shape[0], shape[1] // 2, shape[2] // 2, 4) and image.shape == x.shape
    assert mean.dtype == image.dtype == jnp.float32
    _close(mean, post.mean, "mean")
    _close(logvar, post.logvar, "logvar")
    assert float(logvar.max()) == 20.0 and float(logvar.min()) == -30.0  # the clamp was exercised
    _close(image, decoded, "decode")


def test_posterior_sample_statistics():
    mean = jnp.full((4, 32, 32, 4), 0.5)
    logvar = jnp.full(mean.shape, np.log(4.0))
    sample = jax.jit(V.posterior_sample)
    key = lambda seed: jax.random.key(seed, impl="rbg")  # threefry's normal takes ~4 s to compile on CPU
    s = np.asarray(sample(mean, logvar, key(0)))
    assert abs(s.mean() - 0.5) < 0.05 and abs(s.std() - 2.0) < 0.05
    assert not np.array_equal(s, sample(mean, logvar, key(1)))
    assert V.posterior_mode(mean, logvar) is mean


def test_sd_vae_config_builds_like_diffusers():
    import torch
    from diffusers import AutoencoderKL

    for d in (SD15_VAE_CONFIG, {**SD15_VAE_CONFIG, **NEWER_KEYS}):
        cfg = V.VAEConfig.from_dict(d)
        assert cfg.scaling_factor == 0.18215 and cfg.block_out_channels == (128, 256, 512, 512)
    with torch.device("meta"):
        ref = AutoencoderKL.from_config(cfg.to_dict())
    assert dict(ref.config)["layers_per_block"] == 2
    ours = torch_layout(V.abstract_params(cfg))
    assert ours == torch_shapes(ref)
    assert sum(int(np.prod(s)) for s in ours.values()) == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("change", [{"mid_block_add_attention": False},
                                    {"use_quant_conv": False, "use_post_quant_conv": False}])
def test_optional_parts_have_diffusers_names(change):
    import torch
    from diffusers import AutoencoderKL

    cfg = V.VAEConfig(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, **change)
    with torch.device("meta"):
        ref = AutoencoderKL.from_config(cfg.to_dict())
    assert torch_layout(V.abstract_params(cfg)) == torch_shapes(ref)


def test_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match=r"my/vae/config.json.*norm_type='spatial'"):
        V.VAEConfig.from_dict({**SD15_VAE_CONFIG, "norm_type": "spatial"}, source="my/vae/config.json")
    with pytest.raises(ConfigError, match="AttnDownEncoderBlock2D"):
        V.VAEConfig.from_dict({**SD15_VAE_CONFIG, "down_block_types": ["AttnDownEncoderBlock2D"] * 4})
    with pytest.raises(ConfigError, match="norm_num_groups"):
        V.VAEConfig.from_dict({**SD15_VAE_CONFIG, "norm_num_groups": 48})
    with pytest.raises(ConfigError, match="mish"):
        V.VAEConfig.from_dict({**SD15_VAE_CONFIG, "act_fn": "mish"})
