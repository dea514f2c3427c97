"""SDXL InstructPix2Pix editing against diffusers' StableDiffusionXLInstructPix2PixPipeline on a
tiny random model (fp32, CPU), its folder round trip, and the clear errors for broken SDXL folders."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import edit_fixtures as fx
import tiny
from test_pipeline import _reference_scheduler


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    return tiny.save_sdxl_pipeline(str(tmp_path_factory.mktemp("sdxl") / "model"), seed=7)


@pytest.fixture(scope="module")
def pipe(sdxl_dir):
    from ip2p_jax.pipeline import EditPipeline

    return EditPipeline.from_pretrained(sdxl_dir, dtype="fp32")


@pytest.fixture(scope="module")
def reference(sdxl_dir):
    from diffusers import StableDiffusionXLInstructPix2PixPipeline

    ref = StableDiffusionXLInstructPix2PixPipeline.from_pretrained(sdxl_dir, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    return ref


def _noise(pipe, seed=0):
    f = pipe.vae_scale
    return np.random.default_rng(seed).standard_normal((1, fx.H // f, fx.W // f, 4)).astype(np.float32)


def _reference_edit(ref, image, noise, sampler, **kw):
    import torch

    ref.scheduler = _reference_scheduler(sampler)
    with torch.no_grad():
        return ref(fx.INSTRUCTION, image=image, height=fx.H, width=fx.W, num_inference_steps=fx.STEPS,
                   latents=torch.from_numpy(noise.transpose(0, 3, 1, 2)), output_type="np", **kw).images[0]


def _edit(pipe, image, noise, sampler, **kw):
    return pipe.edit(image, fx.INSTRUCTION, steps=fx.STEPS, sampler=sampler, schedule="diffusers", latents=noise,
                     resize="keep", batch_size=fx.BATCH, progress=False, **kw).outputs[0]


@pytest.mark.parametrize("sampler,rescale", [("ddim", 0.0), ("euler", 0.0), ("euler", 0.7)])
def test_sdxl_edit_matches_diffusers(pipe, reference, sampler, rescale):
    assert pipe.is_sdxl and pipe.force_zeros_for_empty_prompt and not pipe.is_cosxl_edit
    image, noise = fx.sample_images(1)[0], _noise(pipe)
    scales = dict(text_scale=5.0, image_scale=1.5)
    want = _reference_edit(reference, image, noise, sampler, guidance_scale=5.0, image_guidance_scale=1.5,
                           guidance_rescale=rescale)
    got = _edit(pipe, image, noise, sampler, guidance_rescale=rescale, **scales)
    assert got.array.shape == want.shape == (fx.H, fx.W, 3)
    mx, mean = fx.max_mean_abs(np.asarray(got.image) / 255.0, want)
    assert mx <= 1e-2 and mean <= 1e-3, (sampler, rescale, mx, mean)
    assert np.abs(got.array - np.asarray(image) / 255.0).mean() > 0.02   # the edit did something
    if rescale:   # negative control: the rescale changes the edit, and the settings say so
        plain = _edit(pipe, image, noise, sampler, **scales)
        assert fx.max_mean_abs(plain.array, got.array)[0] > 1e-2
        assert got.settings["guidance_rescale"] == rescale and "guidance_rescale" not in plain.settings


def test_sdxl_encoded_empty_prompt_and_per_example_scales(pipe, reference, monkeypatch):
    """force_zeros_for_empty_prompt=False: the null branches use the encoded "" prompt (both
    encoders), as diffusers builds them; and zeros (the default) are a different edit."""
    image, noise = fx.sample_images(1)[0], _noise(pipe, 1)
    reference.register_to_config(force_zeros_for_empty_prompt=False)
    try:
        want = _reference_edit(reference, image, noise, "euler", guidance_scale=6.0, image_guidance_scale=1.3)
    finally:
        reference.register_to_config(force_zeros_for_empty_prompt=True)
    zeros = _edit(pipe, image, noise, "euler", text_scale=6.0, image_scale=1.3)
    monkeypatch.setattr(pipe, "force_zeros_for_empty_prompt", False)
    got = _edit(pipe, image, noise, "euler", text_scale=6.0, image_scale=1.3)
    mx, mean = fx.max_mean_abs(got.array, want)
    assert mx <= 1e-2 and mean <= 1e-3, (mx, mean)
    assert fx.max_mean_abs(zeros.array, want)[0] > 1e-2
    # per-example scales and batching: row j of one call equals its own edit
    images = fx.sample_images(2)
    both = pipe.edit(images, fx.INSTRUCTION, steps=fx.STEPS, sampler="euler", seed=3, text_scale=[6.0, 4.0],
                     image_scale=[1.3, 2.0], resize="keep", batch_size=fx.BATCH, progress=False)
    alone = pipe.edit(images[1], fx.INSTRUCTION, steps=fx.STEPS, sampler="euler", seed=4, text_scale=4.0,
                      image_scale=2.0, resize="keep", batch_size=fx.BATCH, progress=False)
    np.testing.assert_allclose(both.arrays[1], alone.arrays[0], atol=2e-6)


def test_cosxl_flag_scales_the_image_latents(sdxl_dir, pipe):
    """is_cosxl_edit multiplies the image latents by the VAE scaling factor (read from the flag or
    model_index.json); the sampler for CosXL (EDM Euler) is configured separately."""
    from ip2p_jax.pipeline import EditPipeline
    from ip2p_jax.weights import load

    cos = EditPipeline(load(sdxl_dir), dtype="fp32", is_cosxl_edit=True)
    assert cos.is_cosxl_edit and cos._image_latent_scale == pytest.approx(cos.vae_config.scaling_factor)
    image, noise = fx.sample_images(1)[0], _noise(pipe)
    a = _edit(cos, image, noise, "euler", text_scale=5.0, image_scale=1.5)
    b = _edit(pipe, image, noise, "euler", text_scale=5.0, image_scale=1.5)
    assert fx.max_mean_abs(a.array, b.array)[0] > 1e-2


def test_sdxl_folder_round_trip_edits_equally_in_diffusers(sdxl_dir, reference, tmp_path):
    import torch
    from diffusers import StableDiffusionXLInstructPix2PixPipeline
    from ip2p_jax.weights import load, save_diffusers_folder

    c = load(sdxl_dir)
    assert c.is_sdxl and c.pipeline_config == {"force_zeros_for_empty_prompt": True, "is_cosxl_edit": False}
    out = save_diffusers_folder(c, str(tmp_path / "exported"))
    index = json.load(open(os.path.join(out, "model_index.json")))
    assert index["_class_name"] == "StableDiffusionXLInstructPix2PixPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    ours = StableDiffusionXLInstructPix2PixPipeline.from_pretrained(out, add_watermarker=False)
    ours.set_progress_bar_config(disable=True)
    image = fx.sample_images(1)[0]
    noise = np.random.default_rng(2).standard_normal((1, fx.H // 2, fx.W // 2, 4)).astype(np.float32)   # VAE factor 2
    kw = dict(guidance_scale=5.0, image_guidance_scale=1.5)
    np.testing.assert_allclose(_reference_edit(ours, image, noise, "euler", **kw),
                               _reference_edit(reference, image, noise, "euler", **kw), atol=1e-6)
    # fp16 variants (what the hub's SDXL repos ship) load to the fp16-rounded weights
    half = tmp_path / "fp16"
    reference.to(torch.float16).save_pretrained(str(half), variant="fp16")
    reference.to(torch.float32)
    h = load(str(half), variant="fp16")
    k = h.text2_params["text_model"]["encoder"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    want = c.text2_params["text_model"]["encoder"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    np.testing.assert_array_equal(np.asarray(k, np.float32), want.astype(np.float16).astype(np.float32))
    assert any("text_encoder_2: read text_encoder_2/model.fp16.safetensors" in n for n in h.notes)


# ---------------------------------------------------------------------------- bad input

def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _edit_index(folder, **changes):
    path = os.path.join(folder, "model_index.json")
    index = json.load(open(path))
    index.update(changes)
    index = {k: v for k, v in index.items() if v != "DROP"}
    json.dump(index, open(path, "w"))


def test_broken_sdxl_folders_name_the_file(sdxl_dir, tmp_path, tmp_path_factory):
    from ip2p_jax.weights import load
    from ip2p_jax.weights.naming import WeightsError

    sd_dir = fx.tiny_model_dir(tmp_path_factory)
    # an SD UNet in an SDXL folder
    mixed = _copy(sdxl_dir, tmp_path / "mixed")
    shutil.rmtree(os.path.join(mixed, "unet"))
    shutil.copytree(os.path.join(sd_dir, "unet"), os.path.join(mixed, "unet"))
    with pytest.raises(WeightsError, match=r"mixed/unet/config.json: a Stable Diffusion UNet .* mixes SD and SDXL"):
        load(mixed)
    # an SD pipeline class listing SDXL's second encoder
    listed = _copy(sdxl_dir, tmp_path / "listed")
    _edit_index(listed, _class_name="StableDiffusionInstructPix2PixPipeline")
    with pytest.raises(WeightsError, match=r"listed/model_index.json: .*mixes SD and SDXL"):
        load(listed)
    # missing second tokenizer / encoder
    for part in ("tokenizer_2", "text_encoder_2"):
        broken = _copy(sdxl_dir, tmp_path / f"no_{part}")
        shutil.rmtree(os.path.join(broken, part))
        with pytest.raises(WeightsError, match=rf"no_{part}: missing {part}/"):
            load(broken)
    # an SDXL pipeline whose model_index.json lacks text_encoder_2
    unlisted = _copy(sdxl_dir, tmp_path / "unlisted")
    _edit_index(unlisted, text_encoder_2="DROP")
    with pytest.raises(WeightsError, match=r"unlisted/model_index.json: .*without a text_encoder_2"):
        load(unlisted)
    # an SDXL (text_time) UNet in an SD folder: no second encoder to condition it
    sdxl_unet = _copy(sd_dir, tmp_path / "sdxl_unet")
    shutil.rmtree(os.path.join(sdxl_unet, "unet"))
    shutil.copytree(os.path.join(sdxl_dir, "unet"), os.path.join(sdxl_unet, "unet"))
    with pytest.raises(WeightsError, match=r"sdxl_unet/unet/config.json: the UNet expects SDXL conditioning"):
        load(sdxl_unet)


def test_guidance_rescale_is_checked(pipe):
    from ip2p_jax.pipeline import EditError

    for bad in (-0.1, 1.5, float("nan"), "0.5"):
        with pytest.raises(EditError, match="guidance_rescale"):
            pipe.edit(fx.sample_images(1)[0], fx.INSTRUCTION, steps=1, guidance_rescale=bad, progress=False)


def test_cli_edits_an_sdxl_folder(sdxl_dir, tmp_path):
    from ip2p_jax import cli

    img = tmp_path / "in.png"
    fx.sample_images(1)[0].save(img)
    out = tmp_path / "out"
    code = cli.main(["edit", "--model", sdxl_dir, "--image", str(img), "--instruction", fx.INSTRUCTION, "--out",
                     str(out), "--steps", "2", "--sampler", "euler", "--resize", "keep",
                     "--guidance-rescale", "0.7", "--seed", "1", "--dtype", "fp32", "--quiet"])
    assert code == 0
    side = json.load(open(next(p for p in out.iterdir() if p.suffix == ".json")))
    # no --text-scale: an SDXL editor's default is diffusers' 5.0, not SD's 7.5
    assert side["guidance_rescale"] == 0.7 and side["text_scale"] == 5.0
    assert cli.main(["edit", "--model", sdxl_dir, "--image", str(img), "--instruction", "x", "--out",
                     str(tmp_path / "bad"), "--guidance-rescale", "2", "--quiet"]) == 2
    # ip2p convert keeps the SDXL layout
    from ip2p_jax.weights import load

    assert cli.main(["convert", sdxl_dir, str(tmp_path / "half"), "--dtype", "fp16"]) == 0
    from ip2p_jax.weights.io import read_state_dict

    assert load(str(tmp_path / "half")).is_sdxl
    state = read_state_dict(str(tmp_path / "half" / "text_encoder_2" / "model.safetensors"))
    assert "text_projection.weight" in state and {str(v.dtype) for v in state.values()} == {"float16"}


def test_sdxl_single_file_round_trip(sdxl_dir, tmp_path):
    """An SDXL single file (original layout, as our writer and diffusers' converters name it)
    loads with config=<its folder> to the folder's params; diffusers' from_single_file reads our
    file to the same weights; without a config folder the error says what to pass."""
    import torch
    from diffusers import StableDiffusionXLInstructPix2PixPipeline
    from flax import traverse_util
    from ip2p_jax.weights import load, load_single_file
    from ip2p_jax.weights.io import read_state_dict
    from ip2p_jax.weights.naming import WeightsError
    from ip2p_jax.weights.single_file import save_single_file

    want = load(sdxl_dir)
    path = save_single_file(want, str(tmp_path / "sdxl.safetensors"))
    keys = set(read_state_dict(path))
    assert {"model.diffusion_model.label_emb.0.0.weight", "conditioner.embedders.1.model.text_projection",
            "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"} <= keys
    assert any(k.startswith("conditioner.embedders.0.transformer.text_model.") for k in keys)
    got = load_single_file(path, config=sdxl_dir)
    assert got.is_sdxl and got.pipeline_config == want.pipeline_config
    for name in ("unet_params", "vae_params", "text_params", "text2_params"):
        a, b = (traverse_util.flatten_dict(getattr(c, name)) for c in (got, want))
        assert a.keys() == b.keys(), name
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name} {k}")
    ref = StableDiffusionXLInstructPix2PixPipeline.from_single_file(path, config=sdxl_dir, local_files_only=True,
                                                                    add_watermarker=False)
    folder = StableDiffusionXLInstructPix2PixPipeline.from_pretrained(sdxl_dir, add_watermarker=False)
    for part in ("unet", "text_encoder", "text_encoder_2", "vae"):
        mine, theirs = getattr(ref, part).state_dict(), getattr(folder, part).state_dict()
        assert mine.keys() == theirs.keys(), part
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), part
    with pytest.raises(WeightsError, match=r"sdxl.safetensors: an SDXL checkpoint .*config="):
        load_single_file(path)


def test_sdxl_export_and_local_batch_equal_edit(pipe, monkeypatch):
    """The exported SDXL edit (conditioning dicts as its arguments) and edit_local_batch (the
    multi-host entry) give edit()'s result."""
    import jax
    from ip2p_jax.pipeline import export_plan

    image = fx.sample_images(1)[0]
    kw = dict(steps=2, sampler="euler", seed=5, text_scale=5.0, image_scale=1.5)
    fed, real = [], pipe._edit_jit
    monkeypatch.setattr(pipe, "_edit_jit", lambda *a: fed.append(a) or real(*a))
    want = pipe.edit(image, fx.INSTRUCTION, resize="keep", batch_size=1, progress=False, **kw).arrays[0]
    params, plan, pixels, cond, null, *rest = fed[0]
    assert set(cond) == {"text", "pooled", "time_ids"} and set(null) == {"text", "pooled"}
    np.testing.assert_array_equal(np.asarray(cond["time_ids"]), [[fx.H, fx.W, 0, 0, fx.H, fx.W]])
    exported = pipe.export(platform="cpu", batch=1, size=(fx.H, fx.W), steps=2, sampler="euler")
    got = jax.export.deserialize(exported.serialize()).call(params, export_plan(plan), pixels, cond, null, *rest)
    np.testing.assert_allclose(np.asarray(got)[0], want, atol=1e-5)
    local = pipe.edit_local_batch([image], [fx.INSTRUCTION], [5], [5.0], [1.5], steps=2, sampler="euler")
    np.testing.assert_allclose(local[0], want, atol=1e-5)


@pytest.mark.parametrize("schedule", ["exponential"])
def test_cosxl_edit_matches_diffusers(sdxl_dir, tmp_path, schedule):
    """CosXL Edit: an SDXL editor with an EDM v-prediction scheduler (EDMEulerScheduler, CosXL's
    sigmas) and is_cosxl_edit=True edits with edm_euler by default and equals diffusers; negative
    controls: without the latent scaling, and read as the original DDPM model, the edit differs."""
    import torch
    from diffusers import EDMEulerScheduler, StableDiffusionXLInstructPix2PixPipeline
    from ip2p_jax.pipeline import EditPipeline

    path = str(tmp_path / "cosxl")
    shutil.copytree(sdxl_dir, path)
    shutil.rmtree(os.path.join(path, "scheduler"))
    EDMEulerScheduler(sigma_min=0.002, sigma_max=120.0, sigma_data=1.0, sigma_schedule=schedule,
                      prediction_type="v_prediction").save_pretrained(os.path.join(path, "scheduler"))
    with open(os.path.join(path, "model_index.json")) as f:
        index = json.load(f)
    index["scheduler"] = ["diffusers", "EDMEulerScheduler"]
    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump(index, f)

    ref = StableDiffusionXLInstructPix2PixPipeline.from_pretrained(path, add_watermarker=False, is_cosxl_edit=True)
    ref.set_progress_bar_config(disable=True)
    assert isinstance(ref.scheduler, EDMEulerScheduler)
    pipe = EditPipeline.from_pretrained(path, dtype="fp32", is_cosxl_edit=True)
    assert pipe.default_sampler == "edm_euler" and pipe.is_cosxl_edit
    image, noise = fx.sample_images(1)[0], _noise(pipe, 2)
    with torch.no_grad():
        want = ref(fx.INSTRUCTION, image=image, height=fx.H, width=fx.W, num_inference_steps=fx.STEPS,
                   guidance_scale=5.0, image_guidance_scale=1.5,
                   latents=torch.from_numpy(noise.transpose(0, 3, 1, 2)), output_type="np").images[0]
    got = pipe.edit(image, fx.INSTRUCTION, steps=fx.STEPS, latents=noise, text_scale=5.0, image_scale=1.5,
                    resize="keep", batch_size=fx.BATCH, progress=False).outputs[0]
    assert got.settings["sampler"] == "edm_euler"
    mx, mean = fx.max_mean_abs(np.asarray(got.image) / 255.0, want)
    assert mx <= 1e-2 and mean <= 1e-3, (mx, mean)
    assert np.abs(got.array - np.asarray(image) / 255.0).mean() > 0.02
    unscaled = EditPipeline.from_pretrained(path, dtype="fp32", is_cosxl_edit=False)
    plain = unscaled.edit(image, fx.INSTRUCTION, steps=fx.STEPS, latents=noise, text_scale=5.0, image_scale=1.5,
                          resize="keep", batch_size=fx.BATCH, progress=False).outputs[0]
    assert fx.max_mean_abs(plain.array, want)[0] > 1e-2
