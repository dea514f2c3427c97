"""EditPipeline against diffusers' StableDiffusionInstructPix2PixPipeline, and its batching,
seeding and sharding guarantees (tiny random weights, fp32, CPU)."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

import edit_fixtures as fx
import tiny
from train_helpers import subprocess_env

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SCALES_T, SCALES_I = [7.5, 3.0, 10.0], [1.5, 1.2, 2.0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return fx.tiny_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def pipe(model_dir):
    from ip2p_jax.pipeline import EditPipeline

    return EditPipeline.from_pretrained(model_dir, dtype="fp32")


@pytest.fixture(scope="module")
def batched(pipe):
    """Three images, per-example guidance scales, seeds 11..13, one padded batch of 4."""
    return pipe.edit(fx.sample_images(3), fx.INSTRUCTION, steps=fx.STEPS, seed=11, text_scale=SCALES_T,
                     image_scale=SCALES_I, resize="keep", batch_size=fx.BATCH, progress=False)


def _reference_scheduler(sampler):
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                           EulerDiscreteScheduler)

    if sampler == "euler_a":   # our schedule="diffusers": linear sigma interpolation, linspace spacing
        return EulerAncestralDiscreteScheduler(**SD, timestep_spacing="linspace", steps_offset=0)
    if sampler == "ddim":
        return DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                             timestep_spacing="leading", prediction_type="epsilon")
    if sampler == "euler":
        return EulerDiscreteScheduler(**SD, timestep_spacing="linspace", interpolation_type="linear",
                                      steps_offset=0, use_karras_sigmas=False, final_sigmas_type="zero")
    return DPMSolverMultistepScheduler(**SD, algorithm_type="dpmsolver++", solver_order=2,
                                       solver_type="midpoint", lower_order_final=True, euler_at_final=False,
                                       use_karras_sigmas=False, final_sigmas_type="zero",
                                       timestep_spacing="linspace", steps_offset=0)


@pytest.fixture(scope="module")
def reference(model_dir):
    from diffusers import StableDiffusionInstructPix2PixPipeline

    ref = StableDiffusionInstructPix2PixPipeline.from_pretrained(
        model_dir, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_parity_with_diffusers(pipe, reference, sampler):
    import torch

    ref = reference
    steps = fx.STEPS   # DPM++ 2M: first order, second order, first order (to sigma 0)
    image = fx.sample_images(1)[0]
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((1, fx.H // pipe.vae_scale, fx.W // pipe.vae_scale, 4)).astype(np.float32)
    ref.scheduler = _reference_scheduler(sampler)
    with torch.no_grad():
        want = ref(fx.INSTRUCTION, image=image, num_inference_steps=steps, guidance_scale=7.5,
                   image_guidance_scale=1.5, latents=torch.from_numpy(noise.transpose(0, 3, 1, 2)),
                   output_type="np").images[0]
    got = pipe.edit(image, fx.INSTRUCTION, steps=steps, sampler=sampler, schedule="diffusers", latents=noise,
                    text_scale=7.5, image_scale=1.5, resize="keep", batch_size=fx.BATCH, progress=False)
    assert got.arrays[0].shape == want.shape == (fx.H, fx.W, 3)
    mx, mean = fx.max_mean_abs(got.arrays[0], want)
    assert mx < 1e-2 and mean < 1e-3, (sampler, mx, mean)
    # the edit did something: far from the input image
    assert np.abs(got.arrays[0] - np.asarray(image) / 255.0).mean() > 0.02
    assert got.settings[0]["latents"] == "given" and got.settings[0]["sampler"] == sampler


def _replay_step_noise(monkeypatch, seed, shape):
    """Make diffusers' Euler-A draw our ancestral noise: at step i, normal(fold_in(key(seed), i))
    (NHWC, as the pipeline draws it), handed to diffusers as NCHW, in order. Returns the iterator
    (exhausted once every step drew one tensor)."""
    import jax
    import torch
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as euler_a_module

    key = jax.random.key(np.uint32(seed))
    noise = (np.asarray(jax.random.normal(jax.random.fold_in(key, i), shape)) for i in range(fx.STEPS))
    replay = iter([torch.from_numpy(np.ascontiguousarray(z.transpose(2, 0, 1)))[None] for z in noise])

    def randn_tensor(shp, **kw):
        z = next(replay)
        assert tuple(shp) == tuple(z.shape), (shp, z.shape)
        return z

    monkeypatch.setattr(euler_a_module, "randn_tensor", randn_tensor)
    return replay


def test_euler_a_parity_with_diffusers_replayed_noise(pipe, reference, monkeypatch):
    """The shipped Euler-A edit against diffusers' pipeline, both sampling with the same start and
    ancestral noise; with other ancestral noise (another seed) the edit differs clearly."""
    import torch

    ref, seed, steps = reference, 5, fx.STEPS
    image = fx.sample_images(1)[0]
    h, w = fx.H // pipe.vae_scale, fx.W // pipe.vae_scale
    noise = np.random.default_rng(1).standard_normal((1, h, w, 4)).astype(np.float32)
    replay = _replay_step_noise(monkeypatch, seed, (h, w, 4))
    ref.scheduler = _reference_scheduler("euler_a")
    with torch.no_grad():
        want = ref(fx.INSTRUCTION, image=image, num_inference_steps=steps, guidance_scale=7.5,
                   image_guidance_scale=1.5, latents=torch.from_numpy(noise.transpose(0, 3, 1, 2)),
                   output_type="np").images[0]
    assert next(replay, None) is None   # diffusers drew exactly one noise tensor per step
    kw = dict(steps=steps, sampler="euler_a", schedule="diffusers", latents=noise, text_scale=7.5, image_scale=1.5,
              resize="keep", batch_size=fx.BATCH, progress=False)
    got = pipe.edit(image, fx.INSTRUCTION, seed=seed, **kw)
    mx, mean = fx.max_mean_abs(got.arrays[0], want)
    assert mx < 1e-2 and mean < 1e-3, (mx, mean)
    assert np.abs(got.arrays[0] - np.asarray(image) / 255.0).mean() > 0.02
    # negative control: the same start noise with another seed's ancestral noise misses clearly
    other = pipe.edit(image, fx.INSTRUCTION, seed=seed + 1, **kw)
    mx_other, mean_other = fx.max_mean_abs(other.arrays[0], want)
    assert mean_other > 10 * 1e-3 and mx_other > 1e-2, (mx_other, mean_other)


def test_euler_a_reproducible_and_seeds_reported(pipe, batched):
    again = pipe.edit(fx.sample_images(3), fx.INSTRUCTION, steps=fx.STEPS, seed=11, text_scale=SCALES_T,
                      image_scale=SCALES_I, resize="keep", batch_size=fx.BATCH, progress=False)
    assert batched.seeds == again.seeds == [11, 12, 13]
    for a, b in zip(batched.arrays, again.arrays):
        np.testing.assert_array_equal(a, b)
    assert len(batched.images) == 3 and batched.images[0].size == (fx.W, fx.H)
    # different seeds give different results; outputs differ across the batch
    assert np.abs(batched.arrays[0] - batched.arrays[1]).mean() > 1e-3
    s = batched.settings[1]
    assert (s["text_scale"], s["image_scale"], s["steps"], s["sampler"], s["schedule"]) == (3.0, 1.2, 3, "euler_a",
                                                                                            "kdiffusion")
    json.dumps(batched.settings)  # sidecar-ready


def test_per_example_scales_equal_separate_calls(pipe, batched):
    """A guidance sweep is one batched call: each row equals its own call (alone in its batch)."""
    images = fx.sample_images(3)
    for i in (1, 2):
        alone = pipe.edit(images[i], fx.INSTRUCTION, steps=fx.STEPS, seed=11 + i, text_scale=SCALES_T[i],
                          image_scale=SCALES_I[i], resize="keep", batch_size=fx.BATCH, progress=False)
        np.testing.assert_allclose(alone.arrays[0], batched.arrays[i], atol=1e-5)


def test_random_seed_is_reported_and_reproduces(pipe):
    image = fx.sample_images(1)[0]
    first = pipe.edit(image, fx.INSTRUCTION, steps=fx.STEPS, resize="keep", batch_size=fx.BATCH, progress=False)
    seed = first.seeds[0]
    assert isinstance(seed, int) and 0 <= seed < 2 ** 32
    again = pipe.edit(image, fx.INSTRUCTION, steps=fx.STEPS, seed=seed, resize="keep", batch_size=fx.BATCH,
                      progress=False)
    np.testing.assert_array_equal(first.arrays[0], again.arrays[0])


def test_empty_instruction_returns_resized_input(pipe):
    big = Image.fromarray(tiny.random_image(100, 150))
    res = pipe.edit([big, big], "", resolution=64, num_samples=2, seed=[1, 9], randomize_scales=True,
                    progress=False)
    assert len(res.images) == 4 and res.seeds == [1, 2, 9, 10]
    assert res.images[0].size == (64, 64)   # the authors' rule at resolution 64
    from ip2p_jax import images as imlib
    want = np.asarray(imlib.resize_for_edit(big, mode="authors", resolution=64))
    np.testing.assert_array_equal(np.asarray(res.images[3]), want)
    for s in res.settings:
        assert 6.0 <= s["text_scale"] <= 9.0 and 1.2 <= s["image_scale"] <= 1.8 and s["randomized_scales"]
        assert "empty instruction" in s["note"]


def test_bad_requests_are_clear(pipe):
    img = fx.sample_images(1)[0]
    with pytest.raises(ValueError, match="2 images but 3 instructions"):
        pipe.edit([img, img], ["a", "b", "c"], progress=False)
    with pytest.raises(ValueError, match="unknown sampler"):
        pipe.edit(img, "a", sampler="heun", progress=False)
    with pytest.raises(ValueError, match=r"latents must have shape .*\(1, 12, 16, 4\)"):
        pipe.edit(img, "a", resize="keep", latents=np.zeros((1, 4, 12, 16)), progress=False)
    with pytest.raises(ValueError, match="text_scale: 2 values for 1 images"):
        pipe.edit(img, "a", text_scale=[1, 2], progress=False)
    with pytest.raises(ValueError, match="seeds must lie in"):
        pipe.edit(img, "a", seed=-1, progress=False)
    assert pipe.default_text_scale == 7.5   # an SD editor's (SDXL: test_sdxl_pipeline)
    with pytest.raises(ValueError, match="text_scale / --text-scale must be finite"):
        pipe.edit(img, "a", text_scale="high", progress=False)
    with pytest.raises(ValueError, match="not an image"):
        pipe.edit(np.zeros((4, 4, 7)), "a", progress=False)


MULTI_DEVICE = textwrap.dedent("""
    import os, sys
    import jax   # 4 CPU devices and fast-compile flags from the environment (train_helpers.subprocess_env)
    assert jax.device_count() == 4, jax.devices()
    import numpy as np
    from ip2p_jax import sharding
    sharding.enable_compilation_cache(sys.argv[3])   # exercised here, in a process of its own
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    sys.path.insert(0, sys.argv[4])
    import edit_fixtures as fx
    from ip2p_jax.pipeline import EditPipeline
    pipe = EditPipeline.from_pretrained(sys.argv[1], dtype="fp32")
    assert pipe.num_devices == 4
    imgs = fx.sample_images(3)
    kw = dict(steps=fx.STEPS, resize="keep", batch_size=fx.BATCH, progress=False)
    three = pipe.edit(imgs, fx.INSTRUCTION, seed=11, text_scale=%r, image_scale=%r, **kw)
    # five outputs: a full batch of 4 and a batch of 1 padded to 4; rows 3, 4 repeat rows 0, 1
    five = pipe.edit(imgs + imgs[:2], fx.INSTRUCTION, seed=[11, 12, 13, 11, 12],
                     text_scale=%r, image_scale=%r, **kw)
    np.savez(sys.argv[2], three=np.stack(three.arrays), five=np.stack(five.arrays))
    assert any(name.startswith("jit_edit") for name in os.listdir(sys.argv[3])), os.listdir(sys.argv[3])
""" % (SCALES_T, SCALES_I, SCALES_T + SCALES_T[:2], SCALES_I + SCALES_I[:2]))


def test_four_devices_match_one(model_dir, batched, tmp_path):
    script = tmp_path / "multi.py"
    script.write_text(MULTI_DEVICE)
    out = tmp_path / "out.npz"
    env = subprocess_env(devices=4)
    proc = subprocess.run([sys.executable, str(script), model_dir, str(out), str(tmp_path / "xla_cache"),
                           os.path.dirname(__file__)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(out)
    one = np.stack(batched.arrays)
    np.testing.assert_allclose(got["three"], one, atol=1e-4)   # float round-off only
    np.testing.assert_allclose(got["five"][:3], one, atol=1e-4)
    np.testing.assert_allclose(got["five"][3:], one[:2], atol=1e-4)


def test_long_instruction_truncated_with_warning(pipe, caplog):
    long = " ".join(["make it winter"] * 40)
    with caplog.at_level("WARNING"):
        emb = pipe.encode_text([long, ""])
    assert emb.shape == (2, 77, pipe.text_config.hidden_size)
    assert "truncated" in caplog.text
