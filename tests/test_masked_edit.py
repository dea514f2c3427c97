"""Masked edits: the blend (diffusion/masking.py) against a direct numpy computation, the loop's
after_step hook, the compiled masked edit against the unmasked one (all-white mask: bit for bit;
all-black latent mask: the input's own latents), and edit(mask=...) end to end (outside kept,
inside edited, negative control), with the bad masks people have."""
from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import edit_fixtures as fx
from ip2p_jax import masks
from ip2p_jax.diffusion import masking, samplers
from ip2p_jax.pipeline import EditPipeline

KW = dict(steps=fx.STEPS, resize="keep", batch_size=fx.BATCH, progress=False)
RIGHT = np.zeros((fx.H, fx.W), np.float32)
RIGHT[:, fx.W // 2:] = 1.0          # editable: the right half


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return EditPipeline.from_pretrained(fx.tiny_model_dir(tmp_path_factory), dtype="fp32")


def _arrays(shape, seed=0):
    rng = np.random.default_rng(seed)
    x, clean, noise = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    mask = rng.random(shape[:-1] + (1,)).astype(np.float32)
    return x, clean, noise, mask


@pytest.mark.parametrize("sampler", ["euler_a", "ddim", "dpmpp_2m"])
def test_blend_equals_numpy(sampler):
    plan = samplers.generic_plan(samplers.make_plan(sampler, 4))
    x, clean, noise, mask = _arrays((2, 3, 5, 4))
    i = 1
    sig = np.float64(plan.sigmas[i + 1])
    if sampler == "ddim":   # the variance-preserving sample: sqrt(a) (x0 + sigma noise)
        level = np.sqrt(np.float64(plan.alphas_cumprod[i + 1])) * (clean + sig * noise)
    else:                   # sigma space: x0 + sigma noise
        level = clean + sig * noise
    want = mask * x + (1 - mask) * level
    got = np.asarray(masking.blend(plan, i, x, clean, noise, mask))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if sampler == "ddim":   # negative control: the sigma-space level is wrong for DDIM
        assert np.abs(got - (mask * x + (1 - mask) * (clean + sig * noise))).max() > 1e-3
    ones = np.ones_like(mask)
    assert np.array_equal(np.asarray(masking.blend(plan, i, x, clean, noise, ones)), x)   # bit for bit


SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_noise_levels_equal_diffusers_add_noise(sampler):
    """The level the blend noises the input to is the reference scheduler's add_noise at that
    step's timestep (DDIM: variance-preserving; Euler, diffusers schedule: x0 + sigma noise)."""
    import torch
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    steps = 4
    if sampler == "ddim":
        ref = DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                            timestep_spacing="leading")
    else:
        ref = EulerDiscreteScheduler(**SD, timestep_spacing="linspace", interpolation_type="linear", steps_offset=0)
    ref.set_timesteps(steps)
    plan = samplers.generic_plan(samplers.make_plan(sampler, steps, "diffusers"))
    _, clean, noise, _ = _arrays((1, 3, 5, 4), seed=4)
    for k in range(steps):
        want = ref.add_noise(torch.from_numpy(clean), torch.from_numpy(noise), ref.timesteps[k:k + 1]).numpy()
        np.testing.assert_allclose(np.asarray(masking.noised(plan, k, clean, noise)), want, rtol=1e-5, atol=1e-5)
    if sampler == "euler":   # after the last step sigma is 0: the clean latents themselves
        assert np.array_equal(np.asarray(masking.noised(plan, steps, clean, noise)), clean)


def test_sample_hook_equals_numpy_loop():
    """samplers.sample with the blend after each step = a numpy loop of the step formula + blend."""
    plan = samplers.make_plan("euler", 3)
    x0, clean, noise, mask = _arrays((2, 3, 5, 4), seed=1)
    eps_fn = lambda x, t, i: 0.3 * x + 0.01 * t   # noqa: E731  (any deterministic eps)
    got = samplers.sample(eps_fn, jnp.asarray(noise), plan,
                          after_step=masking.blend_after_step(plan, clean, noise, mask))
    p = jax.tree.map(np.asarray, plan)
    x = noise * p.init_noise_scale
    for i in range(plan.steps):
        eps = 0.3 * (x * p.input_scale[i]) + 0.01 * p.timesteps[i]
        x = p.cx[i] * x + p.ce[i] * eps
        x = mask * x + (1 - mask) * (clean + p.sigmas[i + 1] * noise)
    np.testing.assert_allclose(np.asarray(got), x, rtol=1e-5, atol=1e-5)
    plain = samplers.sample(eps_fn, jnp.asarray(noise), plan)
    assert np.abs(np.asarray(plain) - x).max() > 1e-2      # the hook acts


@pytest.mark.parametrize("sampler", ["euler_a", "ddim", "dpmpp_2m"])
def test_loop_with_a_white_mask_is_the_unmasked_loop_bit_for_bit(sampler):
    """Op by op (no jit, so no compiler rounding choices) a mask of ones changes nothing at all."""
    plan = samplers.generic_plan(samplers.make_plan(sampler, 3))
    _, clean, noise, _ = _arrays((2, 3, 5, 4), seed=2)
    keys = jax.vmap(jax.random.key)(jnp.arange(2, dtype=jnp.uint32))
    eps_fn = lambda x, t, i: jnp.tanh(x) * 0.5 + 0.001 * t   # noqa: E731
    with jax.disable_jit():
        plain = samplers.sample(eps_fn, jnp.asarray(noise), plan, keys)
        white = samplers.sample(eps_fn, jnp.asarray(noise), plan, keys,
                                after_step=masking.blend_after_step(plan, clean, noise, np.ones((2, 3, 5, 1))))
        half = samplers.sample(eps_fn, jnp.asarray(noise), plan, keys,
                               after_step=masking.blend_after_step(plan, clean, noise, np.full((2, 3, 5, 1), 0.5)))
    assert np.array_equal(np.asarray(white), np.asarray(plain))
    assert np.abs(np.asarray(half) - np.asarray(plain)).max() > 1e-2      # negative control


def _compiled_args(pipe, img, seed=3):
    """What edit() feeds its compiled function for one image (padded to fx.BATCH rows)."""
    b, f = fx.BATCH, pipe.vae_scale
    pixels = np.stack([pipe_array(img)] * b)
    emb = pipe.encode_text([fx.INSTRUCTION, ""])
    init = np.stack([pipe.initial_noise(seed, (fx.H // f, fx.W // f, 4))] * b)
    return (pipe.params, samplers.generic_plan(pipe.plan("euler_a", fx.STEPS)), pixels,
            np.stack([emb[0]] * b), emb[1], np.full(b, seed, np.uint32), init,
            np.full(b, 7.5, np.float32), np.full(b, 1.5, np.float32))


def pipe_array(img):
    return np.asarray(img, np.float32) / 127.5 - 1.0


def test_masked_program_with_white_mask_equals_the_unmasked_program(pipe):
    """Compiled, the masked program rounds differently from the unmasked one (XLA fuses and
    reorders differently), so rows without a mask never run it: edit() gives them today's program."""
    img = fx.sample_images(1)[0]
    args = _compiled_args(pipe, img)
    plain = np.asarray(pipe._edit_function([7.5], [1.5])(*args))
    ones = np.ones((fx.BATCH, fx.H, fx.W, 1), np.float32)
    masked_fn = pipe._edit_function([7.5], [1.5], masked=True)
    assert masked_fn is not pipe._edit_jit
    white = np.asarray(masked_fn(*args, ones, np.ones(fx.BATCH, bool)))
    assert np.abs(white - plain).max() < 1e-5
    # the input's latents at the end: an all-black latent mask without the composite decodes the
    # input's own latents, i.e. the VAE round trip of the input (sigma = 0 after the last step)
    black = np.asarray(masked_fn(*args, np.zeros_like(ones), np.zeros(fx.BATCH, bool)))
    round_trip = np.asarray(pipe.autoencode([img])[0], np.float32) / 255.0
    assert np.abs(black[0] - round_trip).max() <= 1 / 255 + 1e-6
    assert np.abs(plain[0] - round_trip).max() > 0.1          # negative control: an edit is not that


def test_masked_edit_keeps_the_outside_and_edits_the_inside(pipe):
    img = fx.sample_images(1)[0]
    inp = np.asarray(img, np.float32) / 255.0
    out = pipe.edit(img, fx.INSTRUCTION, seed=5, mask=RIGHT, **KW).outputs[0]
    plain = pipe.edit(img, fx.INSTRUCTION, seed=5, **KW).outputs[0]
    left, right = slice(0, fx.W // 2), slice(fx.W // 2, fx.W)
    # outside: the input (within the autoencoder's error, here exactly: the pixel composite)
    round_trip_error = np.abs(np.asarray(pipe.autoencode([img])[0], np.float32) / 255.0 - inp).max()
    assert np.abs(out.array[:, left] - inp[:, left]).max() <= min(1 / 255, round_trip_error)
    assert np.array_equal(np.asarray(out.image)[:, left], np.asarray(img)[:, left])
    assert np.abs(out.array[:, right] - inp[:, right]).mean() > 0.05          # inside: edited
    assert np.abs(plain.array[:, left] - inp[:, left]).mean() > 0.05          # negative control: no mask
    assert out.settings["mask"] == "mask of image 0" and out.settings["mask_blur"] == 0.0
    # without the composite the outside is the decoded latent blend: nearer the input than an edit
    latent_only = pipe.edit(img, fx.INSTRUCTION, seed=5, mask=RIGHT, mask_composite=False, **KW).outputs[0]
    assert (np.abs(latent_only.array[:, left] - inp[:, left]).mean()
            < np.abs(plain.array[:, left] - inp[:, left]).mean())
    # a mixed batch: the unmasked row is bit-identical to an unmasked edit, the masked one to its own
    both = pipe.edit([img, img], fx.INSTRUCTION, seed=[5, 5], mask=[RIGHT, None], **KW).outputs
    assert np.array_equal(both[1].array, plain.array) and np.array_equal(both[0].array, out.array)
    # an all-white mask is an ordinary edit
    white = pipe.edit(img, fx.INSTRUCTION, seed=5, mask=np.ones_like(RIGHT), **KW).outputs[0]
    assert np.array_equal(white.array, plain.array)


def test_mask_of_another_size_and_feathering(pipe, tmp_path):
    img = fx.sample_images(1)[0]
    big = Image.fromarray((RIGHT * 255).astype(np.uint8)).resize((fx.W * 3, fx.H * 3), Image.Resampling.NEAREST)
    big.save(tmp_path / "mask.png")
    out = pipe.edit(img, fx.INSTRUCTION, seed=5, mask=str(tmp_path / "mask.png"), mask_blur=2, **KW).outputs[0]
    inp = np.asarray(img)
    far = slice(0, fx.W // 2 - 6)     # away from the edge and its feathering
    assert np.array_equal(np.asarray(out.image)[:, far], inp[:, far])
    assert out.settings["mask"] == str(tmp_path / "mask.png") and out.settings["mask_blur"] == 2.0
    sharp = pipe.edit(img, fx.INSTRUCTION, seed=5, mask=RIGHT, **KW).outputs[0]
    edge = slice(fx.W // 2 - 3, fx.W // 2)
    assert np.abs(out.array[:, edge] - sharp.array[:, edge]).max() > 1e-3   # feathered: the edge blends


def test_soft_mask_is_allowed(pipe):
    img = fx.sample_images(1)[0]
    half = np.full((fx.H, fx.W), 0.5, np.float32)
    soft = pipe.edit(img, fx.INSTRUCTION, seed=5, mask=half, **KW).outputs[0]
    plain = pipe.edit(img, fx.INSTRUCTION, seed=5, **KW).outputs[0]
    inp = np.asarray(img, np.float32) / 255.0
    assert np.abs(soft.array - plain.array).mean() > 1e-2 and np.abs(soft.array - inp).mean() > 1e-2


def test_all_black_mask_warns_and_returns_the_input(pipe, caplog):
    img = fx.sample_images(1)[0]
    with caplog.at_level(logging.WARNING, logger="ip2p_jax.pipeline"):
        out = pipe.edit(img, fx.INSTRUCTION, seed=5, mask=np.zeros((fx.H, fx.W), bool), **KW).outputs[0]
    assert "the mask is all black (nothing is editable): the input is returned unchanged" in caplog.text
    assert np.array_equal(np.asarray(out.image), np.asarray(img)) and "all-black mask" in out.settings["note"]


def test_masked_session_keeps_the_outside_every_turn(pipe):
    img = fx.sample_images(1)[0]
    session = pipe.edit_sequence(img, [fx.INSTRUCTION, "add a red circle"], seed=3, mask=RIGHT, **KW)
    for r in session:
        assert np.array_equal(np.asarray(r.images[0])[:, :fx.W // 2], np.asarray(img)[:, :fx.W // 2])


@pytest.mark.parametrize("mask, message", [
    (Image.new("RGBA", (fx.W, fx.H)), r"alpha channel \(RGBA\); save it as a grayscale image .*getchannel\('A'\)"),
    (Image.new("LA", (fx.W, fx.H)), r"alpha channel \(LA\)"),
    (Image.new("I;16", (fx.W, fx.H)), r"a 16-bit mask; save it as an 8-bit grayscale image"),
    (np.zeros((fx.H, fx.W), np.uint16), r"a 16-bit mask array"),
    (np.zeros((fx.H, fx.W, 4), np.uint8), r"4-channel \(RGBA\) mask array"),
    (np.full((fx.H, fx.W), 2.0), r"float mask must hold values in \[0, 1\]"),
    (np.ones((fx.H, fx.W * 2), np.uint8), r"the mask is 64x24 but its image 32x24: their aspect ratios differ"),
    ("/nonexistent/m.png", r"/nonexistent/m.png: no such mask file"),
])
def test_bad_masks_are_clear_errors(pipe, mask, message):
    with pytest.raises(masks.MaskError, match=message):
        pipe.edit(fx.sample_images(1)[0], fx.INSTRUCTION, seed=5, mask=mask, **KW)


def test_bad_mask_settings(pipe):
    img = fx.sample_images(1)[0]
    with pytest.raises(masks.MaskError, match=r"mask_blur / --mask-blur must be a number of pixels from 0"):
        pipe.edit(img, fx.INSTRUCTION, mask=RIGHT, mask_blur=-1, **KW)
    with pytest.raises(Exception, match=r"3 masks for 2 images"):
        pipe.edit([img, img], fx.INSTRUCTION, mask=[RIGHT] * 3, **KW)
    masks.check_aspect((333, 250), (1000, 750), "m")      # within a pixel: fine
    masks.check_aspect((10, 7), (1000, 750), "m")


# ---------------------------------------------------------------- ip2p edit --mask

def _cli(model_dir, images, out, *extra):
    from ip2p_jax import cli

    return cli.main(["edit", "--model", model_dir, "--image", *images, "--instruction", fx.INSTRUCTION,
                     "--out", str(out), "--steps", str(fx.STEPS), "--resize", "keep", "--batch-size", str(fx.BATCH),
                     "--quiet", "--seed", "5", *extra])


def test_cli_mask(pipe, tmp_path, capsys):
    img = fx.sample_images(1)[0]
    img.save(tmp_path / "photo.png")
    img.resize((fx.W // 2, fx.H)).save(tmp_path / "narrow.png")            # another aspect: skipped
    Image.fromarray((RIGHT * 255).astype(np.uint8)).resize((fx.W * 2, fx.H * 2)).save(tmp_path / "mask.png")
    out = tmp_path / "out"
    code = _cli(pipe.source, [str(tmp_path / "photo.png"), str(tmp_path / "narrow.png")], out,
                "--mask", str(tmp_path / "mask.png"))
    err = capsys.readouterr().err
    assert code == 0 and "narrow.png" in err and "aspect ratios differ" in err
    (png,) = [p for p in os.listdir(out) if p.endswith(".png")]
    got = np.asarray(Image.open(out / png))
    assert np.array_equal(got[:, :fx.W // 2 - 6], np.asarray(img)[:, :fx.W // 2 - 6])   # past the resize filter
    assert json.load(open(out / (png[:-4] + ".json")))["mask"] == str(tmp_path / "mask.png")
    want = pipe.edit(img, fx.INSTRUCTION, seed=5, mask=str(tmp_path / "mask.png"), **KW).outputs[0]
    assert np.array_equal(got, np.asarray(want.image))


def test_cli_bad_mask_is_a_usage_error(tmp_path, capsys):
    fx.sample_images(1)[0].save(tmp_path / "photo.png")
    Image.new("RGBA", (fx.W, fx.H)).save(tmp_path / "mask.png")
    code = _cli("unused-model", [str(tmp_path / "photo.png")], tmp_path / "out", "--mask", str(tmp_path / "mask.png"))
    assert code == 2
    err = capsys.readouterr().err
    assert "mask.png: the mask has an alpha channel (RGBA)" in err and "not a readable" not in err


def test_a_turn_can_have_its_own_mask(pipe):
    img = fx.sample_images(1)[0]
    left = 1.0 - RIGHT
    session = pipe.edit_sequence(img, [fx.INSTRUCTION, {"instruction": "add a red circle", "mask": left}],
                                 seed=3, mask=RIGHT, **KW)
    first, second = (np.asarray(r.images[0]) for r in session)
    half = fx.W // 2
    assert np.array_equal(first[:, :half], np.asarray(img)[:, :half])       # turn 1: the session's mask
    assert np.array_equal(second[:, half:], first[:, half:])                # turn 2: its own (left) mask
    assert np.abs(second[:, :half].astype(int) - first[:, :half]).mean() > 5
