"""Reading and writing checkpoints: diffusers folders, single files, hub ids, conv_in widening, errors.

The truth is diffusers / transformers: a folder we write must load in
StableDiffusionInstructPix2PixPipeline.from_pretrained with identical tensors, a single file we
write must load in diffusers' from_single_file, and the Flax models on loaded params must compute
what the PyTorch models compute.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import tiny
from ip2p_jax import cli
from ip2p_jax.weights import (Components, WeightsError, expand_conv_in, load, load_diffusers_folder,
                              load_single_file, save_diffusers_folder, save_single_file)
from ip2p_jax.weights.io import read_state_dict, write_safetensors

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"
VAE_FILE = "vae/diffusion_pytorch_model.safetensors"
TEXT_FILE = "text_encoder/model.safetensors"


@pytest.fixture(scope="module")
def ip2p_dir(tmp_path_factory):
    return tiny.save_pipeline(str(tmp_path_factory.mktemp("ip2p") / "model"))


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory, ip2p_dir):
    """The same tiny pipeline with a 4-channel Stable Diffusion UNet."""
    d = str(tmp_path_factory.mktemp("sd") / "model")
    shutil.copytree(ip2p_dir, d)
    tiny.unet(4, seed=1).save_pretrained(os.path.join(d, "unet"))
    index = json.load(open(os.path.join(d, "model_index.json")))
    json.dump(dict(index, _class_name="StableDiffusionPipeline"), open(os.path.join(d, "model_index.json"), "w"))
    return d


@pytest.fixture(scope="module")
def components(ip2p_dir) -> Components:
    return load_diffusers_folder(ip2p_dir)


@functools.cache
def unet_apply(config):
    """One compiled UNet per config (the round trip and the 4->8 test share the 8-channel one)."""
    from ip2p_jax.models.unet import UNet2DConditionModel

    return jax.jit(UNet2DConditionModel(config, attention_impl="xla").apply)


def flat(params) -> dict:
    return traverse_util.flatten_dict(params)


def assert_params_equal(a, b):
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg="/".join(k))


def torch_state(module) -> dict:
    """A torch module's weights by the names of the files we compare with (no `text_model.`)."""
    return {k.removeprefix("text_model."): v.detach().numpy() for k, v in module.state_dict().items()
            if not k.endswith("position_ids")}


def copy_of(folder, tmp_path) -> str:
    d = str(tmp_path / "copy")
    shutil.copytree(folder, d)
    return d


# ------------------------------------------------------------------ diffusers folders, both ways

def test_folder_round_trip_through_diffusers(ip2p_dir, components, tmp_path):
    """diffusers folder -> ip2p_jax -> our folder -> diffusers: identical tensors, same tokenizer and
    scheduler; and the Flax models on the loaded params compute what diffusers' models compute."""
    import torch
    from diffusers import StableDiffusionInstructPix2PixPipeline

    out = save_diffusers_folder(components, str(tmp_path / "ours"))
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(out)
    for module, file in ((pipe.unet, UNET_FILE), (pipe.vae, VAE_FILE), (pipe.text_encoder, TEXT_FILE)):
        want = {k.removeprefix("text_model."): v for k, v in read_state_dict(os.path.join(ip2p_dir, file)).items()}
        got = torch_state(module)
        assert got.keys() == want.keys(), file
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{file}: {k}")
    assert pipe.tokenizer(["make it winter"]).input_ids == components.tokenizer(["make it winter"]).input_ids
    reference_sched = json.load(open(os.path.join(ip2p_dir, "scheduler", "scheduler_config.json")))
    assert {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")} == \
        {k: v for k, v in reference_sched.items() if not k.startswith("_")}

    # One forward per network: Flax on our params vs PyTorch on the weights diffusers read from our folder.
    from ip2p_jax.models.clip import CLIPTextModel
    from ip2p_jax.models.vae import AutoencoderKL

    rng = np.random.default_rng(0)
    ids = np.asarray(pipe.tokenizer(["turn the sky red", ""], padding="max_length", max_length=77).input_ids,
                     np.int32)
    with torch.no_grad():
        ctx_ref = pipe.text_encoder(torch.from_numpy(ids).long()).last_hidden_state.numpy()
    ctx = jax.jit(CLIPTextModel(components.text_config, attention_impl="xla").apply)(
        {"params": components.text_params}, ids)
    np.testing.assert_allclose(np.asarray(ctx), ctx_ref, atol=2e-5, rtol=1e-4)

    x = rng.standard_normal((2, 8, 8, 8)).astype(np.float32)
    t = np.array([321, 17])
    with torch.no_grad():
        eps_ref = pipe.unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                            torch.from_numpy(ctx_ref)).sample
    eps = unet_apply(components.unet_config)({"params": components.unet_params}, x, t, ctx_ref)
    np.testing.assert_allclose(np.asarray(eps), eps_ref.numpy().transpose(0, 2, 3, 1), atol=1e-4, rtol=1e-4)

    img = (tiny.random_image(32, 32)[None].astype(np.float32) / 127.5 - 1.0)
    vae = AutoencoderKL(components.vae_config, attention_impl="xla")
    vae_apply = jax.jit(vae.apply, static_argnames="method")
    mean, _ = vae_apply({"params": components.vae_params}, img, method=vae.encode)
    with torch.no_grad():
        mean_ref = pipe.vae.encode(torch.from_numpy(img.transpose(0, 3, 1, 2))).latent_dist.mean.numpy()
        dec_ref = pipe.vae.decode(torch.from_numpy(mean_ref)).sample.numpy()
    np.testing.assert_allclose(np.asarray(mean), mean_ref.transpose(0, 2, 3, 1), atol=1e-4, rtol=1e-4)
    dec = vae_apply({"params": components.vae_params}, np.asarray(mean), method=vae.decode)
    np.testing.assert_allclose(np.asarray(dec), dec_ref.transpose(0, 2, 3, 1), atol=1e-4, rtol=1e-4)


def test_fp16_variant_sharded_and_bin_files(ip2p_dir, components, tmp_path):
    """`<stem>.fp16.safetensors` (asked for, or the only file there), a sharded UNet, and .bin files."""
    import torch

    d = copy_of(ip2p_dir, tmp_path)
    for file in (UNET_FILE, VAE_FILE, TEXT_FILE):
        state = read_state_dict(os.path.join(d, file))
        os.remove(os.path.join(d, file))
        stem, ext = file.rsplit(".", 1)
        write_safetensors({k: v.astype(np.float16) for k, v in state.items()}, os.path.join(d, f"{stem}.fp16.{ext}"))
    for variant in ("fp16", None):
        c = load_diffusers_folder(d, variant=variant)
        assert any("fp16" in n for n in c.notes)
        np.testing.assert_array_equal(c.unet_params["conv_in"]["kernel"],
                                      components.unet_params["conv_in"]["kernel"].astype(np.float16).astype(np.float32))

    d2 = str(tmp_path / "sharded")
    shutil.copytree(ip2p_dir, d2)
    state = read_state_dict(os.path.join(d2, UNET_FILE))
    os.remove(os.path.join(d2, UNET_FILE))
    keys = sorted(state)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[:50],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[50:]}
    for name, ks in shards.items():
        write_safetensors({k: state[k] for k in ks}, os.path.join(d2, "unet", name))
    json.dump({"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}},
              open(os.path.join(d2, "unet", "diffusion_pytorch_model.safetensors.index.json"), "w"))
    os.remove(os.path.join(d2, TEXT_FILE))   # and a transformers pickle
    torch.save({k: torch.from_numpy(v) for k, v in read_state_dict(os.path.join(ip2p_dir, TEXT_FILE)).items()},
               os.path.join(d2, "text_encoder", "pytorch_model.bin"))
    c = load_diffusers_folder(d2)
    assert_params_equal(c.unet_params, components.unet_params)
    assert_params_equal(c.text_params, components.text_params)


def test_bf16_folder_loads_in_diffusers(components, tmp_path):
    from diffusers import UNet2DConditionModel as TorchUNet

    out = save_diffusers_folder(components, str(tmp_path / "bf16"), dtype="bf16")
    assert read_state_dict(os.path.join(out, UNET_FILE))["conv_in.weight"].dtype == np.dtype(jnp.bfloat16)
    unet = TorchUNet.from_pretrained(os.path.join(out, "unet"))
    np.testing.assert_array_equal(
        unet.conv_in.weight.float().detach().numpy().transpose(2, 3, 1, 0),
        np.asarray(components.unet_params["conv_in"]["kernel"]).astype(jnp.bfloat16).astype(np.float32))
    c = load(out)   # and back, as fp32
    assert c.dtypes()["unet"] == "float32"


# ------------------------------------------------------------------ single files (original layout)

# Names as in Stable Diffusion's own checkpoints, for this 2-level, 1-layer-per-block tiny UNet.
ORIGINAL_NAMES = [
    "model.diffusion_model.input_blocks.0.0.weight",                                  # conv_in
    "model.diffusion_model.time_embed.0.weight",
    "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",                      # down 0 resnet 0 conv1
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",  # down 0 attention
    "model.diffusion_model.input_blocks.2.0.op.weight",                               # down 0 downsampler
    "model.diffusion_model.input_blocks.3.0.skip_connection.weight",                  # down 1 resnet 0 shortcut
    "model.diffusion_model.middle_block.1.proj_in.weight",
    "model.diffusion_model.middle_block.2.emb_layers.1.weight",
    "model.diffusion_model.output_blocks.1.1.conv.weight",                            # up 0 (no attention) upsampler
    "model.diffusion_model.output_blocks.3.1.transformer_blocks.0.attn2.to_k.weight",
    "model.diffusion_model.out.2.weight",
    "first_stage_model.encoder.down.0.block.0.conv1.weight",
    "first_stage_model.encoder.down.0.downsample.conv.weight",
    "first_stage_model.decoder.up.1.block.1.conv2.weight",                            # decoder levels reversed
    "first_stage_model.decoder.up.1.upsample.conv.weight",
    "first_stage_model.encoder.mid.attn_1.q.weight",
    "first_stage_model.decoder.mid.block_2.norm1.bias",
    "first_stage_model.quant_conv.weight",
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    "cond_stage_model.transformer.text_model.final_layer_norm.weight",
]


def perturbed(params, seed=1):
    rng = np.random.default_rng(seed)
    return traverse_util.unflatten_dict(
        {k: (v + 0.01 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in flat(params).items()})


def test_single_file_with_ema(ip2p_dir, components, tmp_path):
    import torch
    from diffusers import StableDiffusionInstructPix2PixPipeline

    ema = perturbed(components.unet_params)
    path = save_single_file(components, str(tmp_path / "ip2p.safetensors"), ema_unet_params=ema)
    state = read_state_dict(path)
    assert set(ORIGINAL_NAMES) <= set(state)
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4       # 1x1 conv, as in SD
    assert "model_ema.diffusion_modelinput_blocks00weight" in state
    assert sum(k.startswith("model_ema.diffusion_model") for k in state) == \
        sum(k.startswith("model.diffusion_model.") for k in state)

    c = load_single_file(path, config=ip2p_dir)                                   # EMA preferred
    assert_params_equal(c.unet_params, ema)
    assert_params_equal(c.vae_params, components.vae_params)
    assert_params_equal(c.text_params, components.text_params)
    assert "EMA" in c.notes[0] and c.unet_config == components.unet_config
    c = load_single_file(path, config=ip2p_dir, prefer_ema=False)
    assert_params_equal(c.unet_params, components.unet_params)

    # diffusers' own single-file loader reads our file (non-EMA by default) to the same tensors.
    pipe = StableDiffusionInstructPix2PixPipeline.from_single_file(path, config=ip2p_dir, local_files_only=True)
    for module, file in ((pipe.unet, UNET_FILE), (pipe.vae, VAE_FILE), (pipe.text_encoder, TEXT_FILE)):
        want = {k.removeprefix("text_model."): v for k, v in read_state_dict(os.path.join(ip2p_dir, file)).items()}
        got = torch_state(module)
        assert got.keys() == want.keys()
        assert all(np.array_equal(got[k], want[k]) for k in want), file

    # A PyTorch Lightning style .ckpt without EMA; configs given as our dataclasses.
    ckpt = save_single_file(components, str(tmp_path / "sd.ckpt"))
    assert "state_dict" in torch.load(ckpt, weights_only=True)
    c = load(ckpt, config=components.configs(), tokenizer=ip2p_dir)
    assert_params_equal(c.unet_params, components.unet_params)
    assert "no model_ema" in c.notes[0]


def test_single_file_defaults_to_sd15_configs(ip2p_dir, components, tmp_path):
    """Without configs a file is read as SD 1.5 (in_channels from conv_in) with CLIP's tokenizer from
    the hub; offline, or with a tiny file that does not fit, the error says so and how to fix it."""
    path = save_single_file(components, str(tmp_path / "tiny.safetensors"))
    with pytest.raises(WeightsError, match="holds no tokenizer: pass a tokenizer folder .*--tokenizer.*cannot reach the Hugging Face hub"):
        load_single_file(path)
    from ip2p_jax.weights.single_file import _configs

    dicts, notes, _, _ = _configs(None, read_state_dict(path), path)
    assert dicts["unet"]["in_channels"] == 8 and dicts["unet"]["block_out_channels"] == [320, 640, 1280, 1280]
    assert "in_channels=8 from the file" in notes[0]


@pytest.mark.slow   # traces the full-size SD 1.5 UNet for its shapes
def test_single_file_that_does_not_fit_sd15(ip2p_dir, components, tmp_path):
    path = save_single_file(components, str(tmp_path / "tiny.safetensors"))
    with pytest.raises(WeightsError) as e:
        load_single_file(path, tokenizer=ip2p_dir)
    msg = str(e.value)
    assert path in msg and "mis-shaped" in msg and "Stable Diffusion 1.5" in msg and "--config" in msg


# Names in Stable Diffusion 1.5 / InstructPix2Pix checkpoints (4 levels, 2 resnets per level).
SD15_NAMES = [
    "model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.input_blocks.3.0.op.weight",
    "model.diffusion_model.input_blocks.11.0.in_layers.0.weight",
    "model.diffusion_model.input_blocks.8.1.transformer_blocks.0.ff.net.0.proj.weight",
    "model.diffusion_model.middle_block.1.proj_out.weight", "model.diffusion_model.middle_block.2.out_layers.3.weight",
    "model.diffusion_model.output_blocks.2.1.conv.weight", "model.diffusion_model.output_blocks.5.2.conv.weight",
    "model.diffusion_model.output_blocks.8.2.conv.weight", "model.diffusion_model.output_blocks.3.0.skip_connection.weight",
    "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn1.to_q.weight",
    "first_stage_model.encoder.down.3.block.1.norm2.weight", "first_stage_model.encoder.down.2.downsample.conv.weight",
    "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
    "first_stage_model.decoder.up.3.block.0.conv1.weight", "first_stage_model.decoder.up.0.block.2.conv2.weight",
    "first_stage_model.decoder.up.1.upsample.conv.weight", "first_stage_model.decoder.mid.attn_1.proj_out.weight",
]


@pytest.mark.slow   # traces the full-size networks for their names
def test_sd15_original_names():
    from ip2p_jax.weights.components import SPECS, expected_torch_keys
    from ip2p_jax.weights.diffusers_folder import config_dict
    from ip2p_jax.weights.single_file import SD15_UNET, SD15_VAE, original_names

    found = set()
    for name, cfg in (("unet", dict(SD15_UNET, in_channels=8)), ("vae", SD15_VAE)):
        config = SPECS[name].config_from_dict(cfg, source=name)
        keys = expected_torch_keys(SPECS[name].abstract_params(config))
        found |= set(original_names(name, keys, config_dict(name, config)).values())
    assert set(SD15_NAMES) <= found, set(SD15_NAMES) - found
    assert not any(n.startswith("model.diffusion_model.input_blocks.12") for n in found)


# ------------------------------------------------------------------ 4 -> 8 input channels

def test_expand_conv_in_keeps_outputs(sd_dir, components):
    sd = load_diffusers_folder(sd_dir)
    assert sd.unet_config.in_channels == 4
    params8, config8 = expand_conv_in(sd.unet_params, sd.unet_config)
    assert config8.in_channels == 8 and sd.unet_config.in_channels == 4
    k4, k8 = sd.unet_params["conv_in"]["kernel"], params8["conv_in"]["kernel"]
    assert k8.shape == k4.shape[:2] + (8,) + k4.shape[3:]
    np.testing.assert_array_equal(k8[:, :, :4], k4)
    assert not np.any(k8[:, :, 4:])
    np.testing.assert_array_equal(params8["conv_in"]["bias"], sd.unet_params["conv_in"]["bias"])
    assert np.any(sd.unet_params["conv_in"]["bias"])

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 77, 32)).astype(np.float32)
    t = np.array([10, 700])
    assert config8 == components.unet_config       # so the compiled 8-channel UNet is shared
    out4 = unet_apply(sd.unet_config)({"params": sd.unet_params}, x, t, ctx)
    out8 = unet_apply(config8)({"params": params8}, np.concatenate([x, np.zeros_like(x)], -1), t, ctx)
    np.testing.assert_array_equal(np.asarray(out8), np.asarray(out4))

    with pytest.raises(WeightsError, match="shrink"):
        expand_conv_in(params8, config8, 4)


# ------------------------------------------------------------------ ip2p convert

def test_convert_command(ip2p_dir, sd_dir, tmp_path, capsys):
    out = str(tmp_path / "half")
    assert cli.main(["convert", ip2p_dir, out, "--dtype", "fp16"]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out}" in text and "794,116" in text and "float16" in text and "total" in text
    assert read_state_dict(os.path.join(out, UNET_FILE))["conv_in.weight"].dtype == np.float16
    assert load(out).unet_config.in_channels == 8

    out8 = str(tmp_path / "widened")
    assert cli.main(["convert", sd_dir, out8, "--to-8-channels"]) == 0
    assert "widened from 4 to 8" in capsys.readouterr().out
    c = load(out8)
    assert c.unet_config.in_channels == 8
    assert json.load(open(os.path.join(out8, "model_index.json")))["_class_name"] == \
        "StableDiffusionInstructPix2PixPipeline"


# ------------------------------------------------------------------ hub ids

def test_hub_id_offline_and_download_patterns(ip2p_dir, components, monkeypatch):
    with pytest.raises(WeightsError, match="cannot reach the Hugging Face hub to download "
                                           "timbrooks/instruct-pix2pix.*pass the folder"):
        load("timbrooks/instruct-pix2pix")     # HF_HUB_OFFLINE=1 in tests, nothing cached

    from ip2p_jax.weights import hub

    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, revision=None, **kw):
        calls.append((repo_id, list(allow_patterns)))
        return ip2p_dir

    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot_download)
    c = load("someone/tiny-ip2p", variant=None)
    assert c.source == "someone/tiny-ip2p"
    assert_params_equal(c.unet_params, components.unet_params)
    (repo, patterns), = calls
    assert repo == "someone/tiny-ip2p"
    assert {UNET_FILE, VAE_FILE, TEXT_FILE, "model_index.json", "tokenizer/*"} <= set(patterns)
    assert not any(p.startswith(("safety_checker", "feature_extractor")) or p.endswith(".bin") for p in patterns)


# ------------------------------------------------------------------ bad input: one clear error

def _drop_key(d):
    state = read_state_dict(os.path.join(d, UNET_FILE))
    del state["conv_in.bias"]
    write_safetensors(state, os.path.join(d, UNET_FILE))


def _add_key(d):
    state = read_state_dict(os.path.join(d, UNET_FILE))
    write_safetensors(dict(state, **{"extra.weight": np.zeros(3, np.float32)}), os.path.join(d, UNET_FILE))


def _bad_shape(d):
    state = read_state_dict(os.path.join(d, UNET_FILE))
    write_safetensors(dict(state, **{"conv_in.bias": np.zeros(3, np.float32)}), os.path.join(d, UNET_FILE))


def _unknown_field(d):
    p = os.path.join(d, "unet", "config.json")
    json.dump(dict(json.load(open(p)), frobnicate=3), open(p, "w"))


def _truncate(d):
    p = os.path.join(d, UNET_FILE)
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) // 2)


def _bad_json(d):
    open(os.path.join(d, "vae", "config.json"), "w").write("{not json")


def _bin_without_torch(d, monkeypatch):
    import torch

    state = read_state_dict(os.path.join(d, VAE_FILE))
    os.remove(os.path.join(d, VAE_FILE))
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, os.path.join(d, "vae", "diffusion_pytorch_model.bin"))
    monkeypatch.setitem(sys.modules, "torch", None)   # as if torch were not installed


BAD_FOLDERS = {   # name: (break the folder, the file named, what the message says)
    "missing component file": (lambda d: os.remove(os.path.join(d, VAE_FILE)), "vae", "no weight file"),
    "missing component folder": (lambda d: shutil.rmtree(os.path.join(d, "text_encoder")), "", "missing text_encoder/"),
    "missing key": (_drop_key, UNET_FILE, "missing keys: conv_in.bias"),
    "unexpected key": (_add_key, UNET_FILE, "unexpected keys: extra.weight"),
    "mis-shaped key": (_bad_shape, UNET_FILE, "mis-shaped keys: conv_in.bias: file has (3,)"),
    "unknown config field": (_unknown_field, "unet/config.json", "frobnicate=3"),
    "truncated safetensors": (_truncate, UNET_FILE, "truncated"),
    "invalid json": (_bad_json, "vae/config.json", "not valid JSON"),
    "bin without torch": (_bin_without_torch, "vae/diffusion_pytorch_model.bin", "install ip2p_jax[torch]"),
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_bad_folder_gives_one_clear_error(case, ip2p_dir, tmp_path, monkeypatch, capsys):
    breaker, file, says = BAD_FOLDERS[case]
    d = copy_of(ip2p_dir, tmp_path)
    if breaker is _bin_without_torch:
        breaker(d, monkeypatch)
    else:
        breaker(d)
    with pytest.raises(ValueError) as e:
        load(d)
    msg = str(e.value)
    assert os.path.join(d, file).rstrip("/") in msg and says in msg, msg
    assert cli.main(["convert", d, str(tmp_path / "out")]) == 2            # same through the command
    err = capsys.readouterr().err.split("\r")[-1]       # after the progress bar's last redraw
    assert err.startswith(f"ip2p convert: error: {msg}") and "Traceback" not in err
    assert not os.path.exists(tmp_path / "out")


def test_bad_sources_and_outputs(ip2p_dir, components, tmp_path, capsys):
    missing = str(tmp_path / "nowhere" / "model")
    assert cli.main(["convert", missing, str(tmp_path / "out")]) == 2
    assert f"{missing}: no such file or folder" in capsys.readouterr().err

    not_sd = str(tmp_path / "other.safetensors")
    write_safetensors({"encoder.weight": np.zeros((2, 2), np.float32)}, not_sd)
    with pytest.raises(WeightsError, match="not a Stable Diffusion checkpoint in the original layout"):
        load(not_sd)

    partial = str(tmp_path / "partial_ema.safetensors")
    state = read_state_dict(save_single_file(components, str(tmp_path / "full.safetensors"),
                                             ema_unet_params=components.unet_params))
    del state["model_ema.diffusion_modelout2weight"]
    write_safetensors(state, partial)
    with pytest.raises(WeightsError, match=r"EMA weights for only 207 of 208 .*\(--no-ema\)"):
        load(partial, config=ip2p_dir)

    truncated = str(tmp_path / "cut.ckpt")
    data = open(save_single_file(components, str(tmp_path / "whole.ckpt")), "rb").read()
    open(truncated, "wb").write(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=f"{truncated}: torch.load cannot read it"):
        load(truncated, config=ip2p_dir)

    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert cli.main(["convert", ip2p_dir, str(out)]) == 2
    assert "not a model folder written by ip2p_jax" in capsys.readouterr().err


def test_write_is_atomic(components, tmp_path, monkeypatch):
    """A crash while writing leaves the previous folder as it was and no half-written one."""
    import ip2p_jax.weights.diffusers_folder as df

    out = tmp_path / "model"
    save_diffusers_folder(components, str(out))     # an earlier export (ours: it may be replaced)
    (out / "keep.txt").write_text("precious")
    calls = []

    def failing_write(state, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device", path)
        return write_safetensors(state, path, metadata)

    monkeypatch.setattr(df, "write_safetensors", failing_write)
    with pytest.raises(WeightsError, match="No space left on device"):
        save_diffusers_folder(components, str(out), overwrite=True)
    assert os.listdir(tmp_path) == ["model"] and (out / "keep.txt").read_text() == "precious"
    monkeypatch.undo()
    save_diffusers_folder(components, str(out), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["model"] and not (out / "keep.txt").exists()
    assert dataclasses.asdict(load(str(out)).unet_config) == dataclasses.asdict(components.unet_config)
