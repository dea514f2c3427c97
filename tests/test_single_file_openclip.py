"""Stable Diffusion 2.x single files, whose text encoder is OpenCLIP (`cond_stage_model.model.*`):
they load through diffusers' converter and equal their diffusers folder."""
from __future__ import annotations

import numpy as np
import pytest
from flax import traverse_util

import tiny

LAYERS = 2   # the folder's text encoder; the file has one OpenCLIP block more (SD 2.x's unused last one)


def _sd2_folder(directory: str) -> str:
    import tempfile
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline

    tok = tiny.tokenizer(tempfile.mkdtemp(prefix="tok_"))
    unet = tiny.unet(8, sd2=True, seed=1)
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=tiny.vae(1), text_encoder=tiny.text_encoder(len(tok), seed=1, hidden_act="gelu"), tokenizer=tok,
        unet=unet, scheduler=EulerAncestralDiscreteScheduler(beta_schedule="scaled_linear"), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(directory)
    return directory


def _open_clip_state(text_params_torch: dict, hidden: int, rng) -> dict:
    """transformers CLIPTextModel names -> OpenCLIP's (written here from OpenCLIP's layout, not by
    diffusers' table), plus the extra last block and the text projection SD 2.x files carry."""
    pre, t = "cond_stage_model.model.", {k.removeprefix("text_model."): v for k, v in text_params_torch.items()}
    out = {pre + "token_embedding.weight": t["embeddings.token_embedding.weight"],
           pre + "positional_embedding": t["embeddings.position_embedding.weight"],
           pre + "ln_final.weight": t["final_layer_norm.weight"], pre + "ln_final.bias": t["final_layer_norm.bias"],
           pre + "text_projection": rng.standard_normal((hidden, hidden)).astype(np.float32)}
    for i in range(LAYERS + 1):
        src, dst = f"encoder.layers.{i}.", f"{pre}transformer.resblocks.{i}."
        get = (lambda name: t[src + name]) if i < LAYERS else (  # noqa: E731
            lambda name: rng.standard_normal(t["encoder.layers.0." + name].shape).astype(np.float32))
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = np.concatenate([get(f"self_attn.{p}_proj.{kind}") for p in "qkv"])
            out[dst + f"attn.out_proj.{kind}"] = get(f"self_attn.out_proj.{kind}")
            for ours, theirs in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                                 ("mlp.fc2", "mlp.c_proj")):
                out[dst + f"{theirs}.{kind}"] = get(f"{ours}.{kind}")
    return out


def test_sd2_single_file_with_open_clip_equals_its_folder(tmp_path):
    from ip2p_jax.weights import load, load_single_file
    from ip2p_jax.weights.diffusers_folder import params_to_state
    from ip2p_jax.weights.io import read_state_dict, write_safetensors
    from ip2p_jax.weights.naming import WeightsError
    from ip2p_jax.weights.single_file import save_single_file

    folder = _sd2_folder(str(tmp_path / "sd2"))
    want = load(folder)
    state = read_state_dict(save_single_file(want, str(tmp_path / "sd1_layout.safetensors")))
    state = {k: v for k, v in state.items() if not k.startswith("cond_stage_model.")}
    state.update(_open_clip_state(params_to_state(want.text_params, "text_encoder"), want.text_config.hidden_size,
                                  np.random.default_rng(0)))
    path = str(tmp_path / "sd2.safetensors")
    write_safetensors(state, path)
    got = load_single_file(path, config=folder)
    assert any("OpenCLIP" in n and "layer 2" in n for n in got.notes)
    for name in ("unet_params", "vae_params", "text_params"):
        a, b = (traverse_util.flatten_dict(getattr(c, name)) for c in (got, want))
        assert a.keys() == b.keys(), name
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name} {k}")
    # without its configs, SD 1.5's are assumed, and the error says what to pass
    with pytest.raises(WeightsError, match=r"(?s)sd2.safetensors.*pass its configs"):
        load_single_file(path, tokenizer=folder)
    # negative control: q and k swapped inside in_proj is a different (wrong) encoder
    key = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
    h = want.text_config.hidden_size
    state[key] = np.concatenate([state[key][h:2 * h], state[key][:h], state[key][2 * h:]])
    write_safetensors(state, path)
    bad = load_single_file(path, config=folder).text_params["text_model"]["encoder"]["layers_0"]["self_attn"]
    assert not np.array_equal(bad["q_proj"]["kernel"],
                              want.text_params["text_model"]["encoder"]["layers_0"]["self_attn"]["q_proj"]["kernel"])

