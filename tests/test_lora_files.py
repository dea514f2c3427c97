"""LoRA files both ways with diffusers (tiny random pipeline, fp32, CPU): our export loaded by diffusers'
`load_lora_weights` gives our edit; a LoRA made by diffusers/PEFT (random lora_B) loaded by us gives
diffusers' edit; merging (`ip2p convert --merge-lora`) equals the unmerged LoRA; several LoRAs add;
kohya names go through diffusers' converter; scale 0 / unloading gives the base edit back."""
from __future__ import annotations

import os

import numpy as np
import pytest
from flax import traverse_util

import edit_fixtures as fx
from ip2p_jax import adapters
from ip2p_jax.weights import lora as lora_files
from ip2p_jax.weights.io import read_state_dict

TOL_MAX, TOL_MEAN = 1e-2, 1e-3     # on the 8-bit outputs, in [0, 1]
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return fx.tiny_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def pipe(model_dir):
    from ip2p_jax.pipeline import EditPipeline

    return EditPipeline.from_pretrained(model_dir, dtype="fp32")


def _reference(model_dir):
    from diffusers import DDIMScheduler, StableDiffusionInstructPix2PixPipeline

    ref = StableDiffusionInstructPix2PixPipeline.from_pretrained(
        model_dir, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                                  steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")
    ref.set_progress_bar_config(disable=True)
    return ref


def _noise(pipe):
    rng = np.random.default_rng(0)
    return rng.standard_normal((1, fx.H // pipe.vae_scale, fx.W // pipe.vae_scale, 4)).astype(np.float32)


def ours(pipe) -> np.ndarray:
    out = pipe.edit(fx.sample_images(1)[0], fx.INSTRUCTION, steps=fx.STEPS, sampler="ddim", schedule="diffusers",
                    latents=_noise(pipe), text_scale=7.5, image_scale=1.5, resize="keep", batch_size=fx.BATCH,
                    progress=False)
    return np.asarray(out.images[0], np.float64) / 255.0


def _edit_with_lora(pipe, path) -> np.ndarray:
    """ours() with the LoRA at `path` loaded; unloaded again after."""
    name = pipe.load_lora(path)
    try:
        return ours(pipe)
    finally:
        pipe.unload_lora(name)


def theirs(ref, pipe) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = ref(fx.INSTRUCTION, image=fx.sample_images(1)[0], num_inference_steps=fx.STEPS, guidance_scale=7.5,
                  image_guidance_scale=1.5, latents=torch.from_numpy(_noise(pipe).transpose(0, 3, 1, 2)),
                  output_type="pil").images[0]
    return np.asarray(out, np.float64) / 255.0


def random_lora(pipe, seed: int, rank: int = 4, text: bool = True) -> dict:
    """Our adapters over the UNet's (and text encoder's) attention projections, lora_B random (not zero)."""
    bases = {"unet": pipe.params["unet"]}
    targets = {"unet": adapters.find_targets(bases["unet"], UNET_TARGETS)}
    if text:
        bases["text_encoder"] = pipe.params["text"]
        targets["text_encoder"] = adapters.find_targets(bases["text_encoder"], adapters.TEXT_ATTENTION)
    rng = np.random.default_rng(seed)
    out = {}
    for part, base in bases.items():
        flat = traverse_util.flatten_dict(adapters.init_adapters(base, targets[part], rank, seed=seed))
        out[part] = traverse_util.unflatten_dict(
            {k: (0.3 * rng.standard_normal(v.shape)).astype(np.float32) if k[-1] == "lora_B" else v * 3
             for k, v in flat.items()})
    return out


@pytest.fixture(scope="module")
def base_edit(pipe):
    return ours(pipe)


@pytest.fixture(scope="module")
def our_lora(pipe, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ours") / "lora")
    return lora_files.save_lora(random_lora(pipe, 1), out, rank=4, alpha=8.0)   # factor alpha / r = 2


def test_our_export_loaded_by_diffusers(pipe, model_dir, our_lora, base_edit):
    names = sorted(read_state_dict(os.path.join(our_lora, lora_files.LORA_FILE)))
    assert "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in names
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight" in names
    ref = _reference(model_dir)
    ref.load_lora_weights(our_lora)
    want = theirs(ref, pipe)
    got = _edit_with_lora(pipe, our_lora)
    mx, mean = fx.max_mean_abs(got, want)
    assert mx <= TOL_MAX and mean <= TOL_MEAN, (mx, mean)
    assert fx.max_mean_abs(got, base_edit)[1] > 20 * TOL_MEAN   # negative control: the LoRA changed the edit
    np.testing.assert_array_equal(ours(pipe), base_edit)         # unloading gives the base model back


def _peft_lora(model_dir, folder, conv: bool):
    """A LoRA made by diffusers/PEFT (gaussian lora_A, lora_B set random) and saved with save_lora_weights;
    returns (the reference pipe with the adapter active, the file's folder)."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    ref = _reference(model_dir)
    unet_targets = UNET_TARGETS + (["conv1", "proj_in"] if conv else [])
    ref.unet.add_adapter(LoraConfig(r=4, lora_alpha=2, target_modules=unet_targets, init_lora_weights="gaussian"))
    text_config = LoraConfig(r=2, lora_alpha=4, target_modules=list(adapters.TEXT_ATTENTION),
                             init_lora_weights="gaussian")
    # PEFT itself (transformers' add_adapter wants a newer peft than diffusers' pinned 0.21)
    inject_adapter_in_model(text_config, ref.text_encoder)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for model in (ref.unet, ref.text_encoder):
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))
    ref.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(ref.unet),
                          text_encoder_lora_layers=get_peft_model_state_dict(ref.text_encoder),
                          unet_lora_adapter_metadata=ref.unet.peft_config["default"].to_dict(),
                          text_encoder_lora_adapter_metadata=text_config.to_dict())
    return ref, folder


@pytest.mark.parametrize("conv", [False, True], ids=["attention", "with_convs"])
def test_peft_lora_loaded_by_us(pipe, model_dir, tmp_path, base_edit, conv):
    ref, folder = _peft_lora(model_dir, str(tmp_path / "peft"), conv)
    want = theirs(ref, pipe)
    lora = lora_files.read_lora(folder)
    assert set(lora.factors["unet"].values()) == {0.5} and set(lora.factors["text_encoder"].values()) == {2.0}
    assert any(len(a) == 4 for a, _ in adapters.adapter_modules(lora.adapters["unet"]).values()) == conv
    got = _edit_with_lora(pipe, folder)
    mx, mean = fx.max_mean_abs(got, want)
    assert mx <= TOL_MAX and mean <= TOL_MEAN, (mx, mean)
    assert fx.max_mean_abs(got, base_edit)[1] > 20 * TOL_MEAN


def test_merge_equals_unmerged_and_scales_add(pipe, model_dir, our_lora, tmp_path, base_edit):
    from ip2p_jax import cli
    from ip2p_jax.pipeline import EditPipeline

    second = lora_files.save_lora(random_lora(pipe, 2, rank=2, text=False), str(tmp_path / "second"), rank=2,
                                  alpha=2.0)
    merged_dir = str(tmp_path / "merged")
    assert cli.main(["convert", model_dir, merged_dir, "--merge-lora", f"{our_lora}:0.7",
                     "--merge-lora", second]) == 0
    merged = ours(EditPipeline.from_pretrained(merged_dir, dtype="fp32"))
    a, b = pipe.load_lora(our_lora, 0.7), pipe.load_lora(second, name="second")
    assert pipe.loras == {a: 0.7, "second": 1.0}
    try:
        unmerged = ours(pipe)
        pipe.unload_lora("second")
        only_first = ours(pipe)
    finally:
        pipe.unload_lora()
    mx, mean = fx.max_mean_abs(merged, unmerged)
    assert mx <= 1 / 255 and mean <= 1e-4, (mx, mean)                 # the same weights, up to fp32 sums
    assert fx.max_mean_abs(only_first, unmerged)[1] > 20 * TOL_MEAN    # the second LoRA counted
    assert fx.max_mean_abs(merged, base_edit)[1] > 20 * TOL_MEAN

    pipe.load_lora(our_lora, 0.0)   # negative control: scale 0 is the base model
    try:
        np.testing.assert_array_equal(ours(pipe), base_edit)
    finally:
        pipe.unload_lora()


def _kohya_name(part: str, module: str) -> str:
    torch_name = lora_files.torch_module(module)
    if part == "unet":
        return "lora_unet_" + torch_name.replace(".", "_")
    return "lora_te_" + torch_name.replace(".", "_")


def test_kohya_lora_through_diffusers_converter(pipe, tmp_path):
    """A kohya-named file (lora_unet_* / lora_te_*, lora_down/lora_up, .alpha) reads as the same adapters."""
    from safetensors.numpy import save_file

    lora = random_lora(pipe, 3, rank=4)
    state = {}
    for part, tree in lora.items():
        flat = traverse_util.flatten_dict(tree)
        for module in adapters.adapter_modules(tree):
            p = tuple(module.split("."))
            name = _kohya_name(part, module)
            state[name + ".lora_down.weight"] = np.ascontiguousarray(flat[p + ("lora_A",)].T)
            state[name + ".lora_up.weight"] = np.ascontiguousarray(flat[p + ("lora_B",)].T)
            state[name + ".alpha"] = np.asarray(2.0, np.float32)
    path = str(tmp_path / "kohya.safetensors")
    save_file(state, path)
    got = lora_files.read_lora(path)
    assert set(got.adapters) == {"unet", "text_encoder"}
    for part in lora:
        assert set(got.factors[part].values()) == {0.5}
        want = traverse_util.flatten_dict(lora[part])
        have = traverse_util.flatten_dict(got.adapters[part])
        assert set(have) == set(want)
        for k in want:
            np.testing.assert_array_equal(have[k], want[k])
