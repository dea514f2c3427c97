"""The EDM Euler sampler (CosXL) and v-prediction in the one sampling loop, against diffusers.

A deterministic fake model, out = a_c * x + b_c * sin(t * FREQ) per channel c, written in torch
(NCHW) and JAX (NHWC), drives diffusers' schedulers and `samplers.sample` (sampler fixed at trace
time, and chosen at run time through `generic_plan`, as the edit pipeline runs it). The full SD
edits at the end run the shipped EditPipeline against StableDiffusionInstructPix2PixPipeline on
tiny random weights with the scheduler config of a v-prediction model and of a CosXL-style EDM one.
"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EDMEulerScheduler, EulerDiscreteScheduler

import edit_fixtures as fx
from ip2p_jax import diffusion as D
from ip2p_jax.diffusion import schedules as S

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
COSXL = dict(sigma_min=0.002, sigma_max=120.0, sigma_data=1.0)
SHAPE = (2, 5, 6, 4)
A_CH = np.array([0.9, 1.0, 0.8, 1.1], np.float32)
B_CH = np.array([0.5, -0.4, 0.3, -0.2], np.float32)
FREQ = 3.0     # EDM timesteps are 0.25 log(sigma), in [-1.6, 1.2]: fast enough to see a wrong one
EDM_RTOL = 2e-6        # EDM Euler vs diffusers, of the output's scale (issue 21)
DDPM_RTOL = 1e-5       # the DDPM samplers' loop tolerance (tests/test_diffusion.py RTOL_SCALE)


def out_torch(x, t):
    a, b = torch.from_numpy(A_CH)[None, :, None, None], torch.from_numpy(B_CH)[None, :, None, None]
    return a * x + b * torch.sin(torch.as_tensor(t, dtype=torch.float32) * FREQ)


def out_jax(x, t, i):
    del i
    return jnp.asarray(A_CH) * x + jnp.asarray(B_CH) * jnp.sin(jnp.asarray(t, jnp.float32) * FREQ)


def noise(seed=0):
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


def config_of(sched) -> dict:
    """A scheduler's config as its folder's scheduler_config.json holds it (with _class_name)."""
    return json.loads(sched.to_json_string())


def run_diffusers(sched, steps, x_nhwc):
    sched.set_timesteps(steps)
    x = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))) * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.step(out_torch(sched.scale_model_input(x, t), t), t, x).prev_sample
    return x.numpy().transpose(0, 2, 3, 1)


@jax.jit
def _sample(plan, x, keys):
    return D.sample(out_jax, x, plan, keys)


def run(plan, x, mode):
    keys = jax.vmap(jax.random.key)(jnp.arange(x.shape[0], dtype=jnp.uint32))
    return np.asarray(_sample(D.generic_plan(plan) if mode == "run_time" else plan, jnp.asarray(x), keys))


def rel_err(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


# ----------------------------------------------------------------------------- EDM schedule

@pytest.mark.parametrize("schedule", ["karras", "exponential"])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_edm_sigmas_timesteps_and_scales_equal_diffusers(schedule, final):
    ref = EDMEulerScheduler(**COSXL, sigma_schedule=schedule, final_sigmas_type=final, prediction_type="v_prediction")
    edm = D.noise_schedule_from_config(config_of(ref))
    assert edm == S.EDMSchedule(**COSXL, sigma_schedule=schedule, final_sigmas_type=final,
                                prediction_type="v_prediction")
    for steps in (1, 7, 30):
        ref.set_timesteps(steps)
        plan = D.make_plan("edm_euler", steps, training=edm)
        sigmas = ref.sigmas.numpy()
        assert plan.sigmas.shape == sigmas.shape and plan.timesteps.shape == ref.timesteps.shape
        assert rel_err(plan.sigmas, sigmas) <= EDM_RTOL
        assert rel_err(plan.timesteps, ref.timesteps.numpy()) <= EDM_RTOL
        c_in = np.array([ref.precondition_inputs(torch.ones(()), s).item() for s in ref.sigmas[:-1]])
        assert rel_err(plan.input_scale, c_in) <= EDM_RTOL
        assert abs(float(plan.init_noise_scale) - ref.init_noise_sigma) <= EDM_RTOL * ref.init_noise_sigma
        assert float(plan.sigmas[-1]) == (0.0 if final == "zero" else float(plan.sigmas[-2]))
    # negative control: the other sigma schedule is a different plan
    other = D.make_plan("edm_euler", 30, "exponential" if schedule == "karras" else "karras", training=edm)
    assert rel_err(other.sigmas, sigmas) > 1e-2


@pytest.mark.parametrize("mode", ["static", "run_time"])
@pytest.mark.parametrize("schedule", ["karras", "exponential"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_edm_euler_loop_equals_diffusers(prediction, schedule, mode):
    steps, x = 12, noise(1)
    ref = EDMEulerScheduler(**COSXL, sigma_schedule=schedule, prediction_type=prediction)
    want = run_diffusers(ref, steps, x)
    edm = S.EDMSchedule.from_config(config_of(ref))
    plan = D.make_plan("edm_euler", steps, training=edm)
    assert rel_err(run(plan, x, mode), want) <= EDM_RTOL
    # negative controls: the other prediction type, and timesteps off by 0.05, miss by far more
    other_type = "epsilon" if prediction != "epsilon" else "v_prediction"
    flipped = S.EDMSchedule(**{**edm.__dict__, "prediction_type": other_type})
    assert rel_err(run(D.make_plan("edm_euler", steps, training=flipped), x, mode), want) > 1e-2
    assert rel_err(run(plan.replace(timesteps=plan.timesteps + 0.05), x, mode), want) > 50 * EDM_RTOL


def test_edm_sigma_data_enters_the_preconditioning():
    """diffusers' default sigma_data 0.5 (not CosXL's 1.0) also matches, and differs from 1.0."""
    steps, x = 8, noise(2)
    ref = EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, prediction_type="v_prediction")
    want = run_diffusers(ref, steps, x)
    half = D.noise_schedule_from_config(config_of(ref))
    assert half.sigma_data == 0.5
    assert rel_err(run(D.make_plan("edm_euler", steps, training=half), x, "static"), want) <= EDM_RTOL
    one = S.EDMSchedule(**{**half.__dict__, "sigma_data": 1.0})
    assert rel_err(run(D.make_plan("edm_euler", steps, training=one), x, "static"), want) > 1e-2


# ----------------------------------------------------------------------------- v-prediction, DDPM samplers

def _v_scheduler(sampler, prediction="v_prediction"):
    if sampler == "ddim":
        return DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                             timestep_spacing="leading", prediction_type=prediction)
    if sampler == "euler":
        return EulerDiscreteScheduler(**SD, timestep_spacing="linspace", interpolation_type="linear", steps_offset=0,
                                      final_sigmas_type="zero", prediction_type=prediction)
    return DPMSolverMultistepScheduler(**SD, algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
                                       lower_order_final=True, euler_at_final=False, final_sigmas_type="zero",
                                       timestep_spacing="linspace", steps_offset=0, prediction_type=prediction)


@pytest.mark.parametrize("mode", ["static", "run_time"])
@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_v_prediction_loops_equal_diffusers(sampler, mode):
    steps, x = 10, noise(3)
    want = run_diffusers(_v_scheduler(sampler), steps, x)
    v_model = D.noise_schedule_from_config(config_of(_v_scheduler(sampler)))
    assert v_model == S.TrainingSchedule(prediction_type="v_prediction")
    plan = D.make_plan(sampler, steps, "diffusers", training=v_model)
    assert rel_err(run(plan, x, mode), want) <= DDPM_RTOL
    # negative control: the same sampler reading the output as eps misses clearly
    eps_plan = D.make_plan(sampler, steps, "diffusers", training=S.TrainingSchedule())
    assert rel_err(run(eps_plan, x, mode), want) > 1e-2


def test_epsilon_plans_convert_nothing():
    """An epsilon model's plan converts the output by eps = 0 x + 1 output: the pre-existing loop, bit for bit."""
    for sampler in D.DDPM_SAMPLERS:
        plan = D.make_plan(sampler, 5)
        assert np.all(np.asarray(plan.eps_from_x) == 0) and np.all(np.asarray(plan.eps_from_output) == 1)


def test_one_compiled_loop_serves_edm_and_ddpm_plans():
    traces = []

    @jax.jit
    def f(plan, x, keys):
        traces.append(1)
        return D.sample(out_jax, x, plan, keys)

    x, keys = jnp.asarray(noise(4)), jax.vmap(jax.random.key)(jnp.arange(2, dtype=jnp.uint32))
    a = f(D.generic_plan(D.make_plan("euler", 6, training=S.TrainingSchedule(prediction_type="v_prediction"))), x, keys)
    b = f(D.generic_plan(D.make_plan("edm_euler", 6, training=S.COSXL)), x, keys)
    assert len(traces) == 1 and np.max(np.abs(np.asarray(a) - np.asarray(b))) > 1e-2


# ----------------------------------------------------------------------------- configs and errors

def test_scheduler_configs_and_clear_errors():
    edm_cfg = config_of(EDMEulerScheduler(**COSXL, sigma_schedule="exponential", prediction_type="v_prediction"))
    assert D.noise_schedule_from_config(edm_cfg) == S.COSXL
    assert D.default_sampler(S.COSXL) == "edm_euler" and D.default_sampler(S.TrainingSchedule()) == "euler_a"
    assert D.default_schedule("edm_euler", S.EDMSchedule()) == "karras"
    with pytest.raises(S.ScheduleError, match="m/scheduler: EDMEulerScheduler describes an EDM model"):
        S.TrainingSchedule.from_config(edm_cfg, source="m/scheduler")
    with pytest.raises(S.ScheduleError, match="CosineDPMSolverMultistepScheduler .* is not supported"):
        D.noise_schedule_from_config({"_class_name": "CosineDPMSolverMultistepScheduler"})
    with pytest.raises(S.ScheduleError, match="sigma_schedule 'linear'"):
        D.noise_schedule_from_config({**edm_cfg, "sigma_schedule": "linear"})
    with pytest.raises(S.ScheduleError, match="0 < sigma_min < sigma_max"):
        D.noise_schedule_from_config({**edm_cfg, "sigma_min": 200.0})
    with pytest.raises(S.ScheduleError, match="prediction_type 'sample'"):
        D.noise_schedule_from_config({**edm_cfg, "prediction_type": "sample"})
    with pytest.raises(S.ScheduleError, match="euler_a needs a model trained on DDPM betas.*use edm_euler"):
        D.make_plan("euler_a", 10, training=S.COSXL)
    with pytest.raises(S.ScheduleError, match="edm_euler samples EDM-trained models.*DDPM"):
        D.make_plan("edm_euler", 10, training=S.TrainingSchedule())
    with pytest.raises(S.ScheduleError, match="edm_euler: schedule 'kdiffusion' is not one of"):
        D.make_plan("edm_euler", 10, "kdiffusion")
    with pytest.raises(S.ScheduleError, match="euler: schedule 'exponential'"):
        D.check_names("euler", 10, "exponential")


# ----------------------------------------------------------------------------- full SD edits vs diffusers

def _folder_with_scheduler(tmp_path_factory, name, scheduler) -> str:
    """The shared tiny editor with another scheduler config (random weights: a 'v' or EDM model is
    the same network read through another parametrisation)."""
    path = str(tmp_path_factory.mktemp(name) / "model")
    shutil.copytree(fx.tiny_model_dir(tmp_path_factory), path)
    scheduler.save_config(os.path.join(path, "scheduler"))
    with open(os.path.join(path, "model_index.json")) as f:
        index = json.load(f)
    index["scheduler"] = ["diffusers", type(scheduler).__name__]
    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump(index, f)
    return path


def _edit_both(path, ref_scheduler, **ours):
    from diffusers import StableDiffusionInstructPix2PixPipeline

    from ip2p_jax.pipeline import EditPipeline

    pipe = EditPipeline.from_pretrained(path, dtype="fp32")
    ref = StableDiffusionInstructPix2PixPipeline.from_pretrained(
        path, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    image = fx.sample_images(1)[0]
    h, w = fx.H // pipe.vae_scale, fx.W // pipe.vae_scale
    latents = np.random.default_rng(0).standard_normal((1, h, w, 4)).astype(np.float32)
    if ref_scheduler is not None:
        ref.scheduler = ref_scheduler
    with torch.no_grad():
        want = ref(fx.INSTRUCTION, image=image, num_inference_steps=fx.STEPS, guidance_scale=7.5,
                   image_guidance_scale=1.5, latents=torch.from_numpy(latents.transpose(0, 3, 1, 2)),
                   output_type="np").images[0]
    got = pipe.edit(image, fx.INSTRUCTION, steps=fx.STEPS, latents=latents, text_scale=7.5, image_scale=1.5,
                    resize="keep", batch_size=fx.BATCH, progress=False, **ours)
    return pipe, got, want, image, latents


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_v_prediction_sd_edit_equals_diffusers(tmp_path_factory, sampler):
    path = _folder_with_scheduler(tmp_path_factory, f"v_{sampler}", _v_scheduler(sampler))
    pipe, got, want, image, latents = _edit_both(path, None, sampler=sampler, schedule="diffusers")
    assert pipe.training_schedule.prediction_type == "v_prediction"
    mx, mean = fx.max_mean_abs(got.arrays[0], want)
    assert mx < 1e-2 and mean < 1e-3, (sampler, mx, mean)
    assert np.abs(got.arrays[0] - np.asarray(image) / 255.0).mean() > 0.02
    # negative control: the same network read as an epsilon model (the original folder) misses clearly
    from ip2p_jax.pipeline import EditPipeline

    eps_pipe = EditPipeline.from_pretrained(fx.tiny_model_dir(tmp_path_factory), dtype="fp32")
    eps_got = eps_pipe.edit(image, fx.INSTRUCTION, steps=fx.STEPS, sampler=sampler, schedule="diffusers",
                            latents=latents, resize="keep", batch_size=fx.BATCH, progress=False)
    assert fx.max_mean_abs(eps_got.arrays[0], want)[1] > 10 * 1e-3


@pytest.mark.parametrize("schedule", ["exponential", "karras"])
def test_cosxl_style_sd_edit_picks_edm_euler_and_equals_diffusers(tmp_path_factory, schedule):
    sched = EDMEulerScheduler(**COSXL, sigma_schedule=schedule, prediction_type="v_prediction")
    path = _folder_with_scheduler(tmp_path_factory, f"edm_{schedule}", sched)
    pipe, got, want, image, latents = _edit_both(path, None)   # no sampler given: the model's own
    assert pipe.default_sampler == "edm_euler"
    assert got.settings[0]["sampler"] == "edm_euler" and got.settings[0]["schedule"] == schedule
    mx, mean = fx.max_mean_abs(got.arrays[0], want)
    assert mx < 1e-2 and mean < 1e-3, (schedule, mx, mean)
    assert np.abs(got.arrays[0] - np.asarray(image) / 255.0).mean() > 0.02
    # negative control: the other sigma schedule gives another edit
    other = pipe.edit(image, fx.INSTRUCTION, steps=fx.STEPS, schedule="karras" if schedule == "exponential"
                      else "exponential", latents=latents, resize="keep", batch_size=fx.BATCH, progress=False)
    assert fx.max_mean_abs(other.arrays[0], want)[1] > 10 * 1e-3
    # a DDPM-only sampler on this EDM model is refused, naming the folder
    with pytest.raises(S.ScheduleError, match=f"{path}: euler_a needs a model trained on DDPM betas"):
        pipe.edit(image, fx.INSTRUCTION, steps=fx.STEPS, sampler="euler_a", progress=False)


def test_cli_edits_an_edm_model_with_edm_euler_and_refuses_ddpm_samplers(tmp_path_factory, tmp_path, capsys):
    from ip2p_jax import cli

    sched = EDMEulerScheduler(**COSXL, sigma_schedule="exponential", prediction_type="v_prediction")
    path = _folder_with_scheduler(tmp_path_factory, "edm_cli", sched)
    image = tmp_path / "in.png"
    fx.sample_images(1)[0].save(image)
    common = ["edit", "--model", path, "--image", str(image), "--instruction", fx.INSTRUCTION, "--steps",
              str(fx.STEPS), "--resize", "keep", "--batch-size", str(fx.BATCH), "--seed", "3"]
    assert cli.main(common + ["--out", str(tmp_path / "ok")]) == 0
    sidecars = list((tmp_path / "ok").glob("*.json"))
    assert len(sidecars) == 1
    settings = json.loads(sidecars[0].read_text())
    assert settings["sampler"] == "edm_euler" and settings["schedule"] == "exponential"
    capsys.readouterr()
    assert cli.main(common + ["--out", str(tmp_path / "bad"), "--sampler", "ddim"]) == 2
    err = capsys.readouterr().err
    assert f"{path}: ddim needs a model trained on DDPM betas" in err and "use edm_euler" in err
    assert not (tmp_path / "bad").exists()
