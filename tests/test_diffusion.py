"""ip2p_jax.diffusion against diffusers' schedulers and the authors' k-diffusion formulas.

A deterministic fake model, eps = a_c * x + b_c * sin(t / 10) per channel c, is written in
torch (NCHW) and JAX (NHWC); the same full sampling loop must give the same latents. Every loop
test runs through `samplers.sample`, the loop the edit pipeline and the pair stage ship, twice:
with the sampler fixed at trace time (the pair stage) and chosen at run time by a traced index
(`generic_plan`, what the pipeline's one compiled edit does).
"""
import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler)
import diffusers.schedulers.scheduling_euler_ancestral_discrete as euler_a_module

from ip2p_jax import diffusion as D
from ip2p_jax.diffusion import schedules as S
from ip2p_jax.diffusion import samplers

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SHAPE = (2, 5, 6, 4)  # B, h, w, C (NHWC)
A_CH = np.array([0.9, 1.0, 0.8, 1.1], np.float32)   # near 1, like a denoiser: the output stays O(1)
B_CH = np.array([0.5, -0.4, 0.3, -0.2], np.float32)
PERIOD = 10.0  # fast in t, so a shifted timestep moves the result well beyond the tolerance
# Tolerance, relative to the output's max |value|: our loop runs in float32 with per-step
# coefficients from float64 host math; diffusers steps in float32 torch (sigmas stored float32,
# sqrt/log in float32); the k-diffusion reference below is float64. Measured differences are
# <= 2e-6 (DDIM, 100 steps). 1e-5 leaves headroom; each loop test also checks that a plan with
# every timestep one training step off misses by > 2e-4, so the comparison has teeth.
RTOL_SCALE = 1e-5


def eps_torch(x, t):
    a, b = torch.from_numpy(A_CH)[None, :, None, None], torch.from_numpy(B_CH)[None, :, None, None]
    return a * x + b * torch.sin(torch.as_tensor(t, dtype=torch.float32) / PERIOD)


def eps_jax(x, t, i):
    del i   # the fake model ignores the step index
    return jnp.asarray(A_CH) * x + jnp.asarray(B_CH) * jnp.sin(jnp.asarray(t, jnp.float32) / PERIOD)


def to_torch(x_nhwc):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x_nhwc, (0, 3, 1, 2))))


def to_nhwc(x_nchw):
    return np.transpose(x_nchw.numpy(), (0, 2, 3, 1))


def rel_err(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return np.max(np.abs(ours - ref)) / np.max(np.abs(ref))


def assert_close_to_scale(ours, ref, rtol=RTOL_SCALE):
    err = rel_err(ours, ref)
    assert err <= rtol, f"max abs error {err:.3g} of the output scale > {rtol}"


def assert_loop_matches(run, plan, x, want, **kwargs):
    """Our loop equals the reference, and the comparison has teeth: the same plan with every
    UNet timestep one training step off misses the reference by far more than the tolerance."""
    assert_close_to_scale(run(plan, jnp.asarray(x), **kwargs), want)
    shifted = plan.replace(timesteps=plan.timesteps + 1)
    assert rel_err(run(shifted, jnp.asarray(x), **kwargs), want) > 20 * RTOL_SCALE


def noise(seed=0, shape=SHAPE):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def run_diffusers(sched, steps, x_nhwc):
    sched.set_timesteps(steps)
    x = to_torch(x_nhwc) * sched.init_noise_sigma
    for t in sched.timesteps:
        model_in = sched.scale_model_input(x, t)
        x = sched.step(eps_torch(model_in, float(t)), t, x).prev_sample
    return to_nhwc(x)


@jax.jit
def run_static(plan, x, keys=None, ancestral_noise=None):
    """samplers.sample with plan.sampler fixed at trace time."""
    return D.sample(eps_jax, x, plan, keys, ancestral_noise=ancestral_noise)


def run_kind(plan, x, keys=None, ancestral_noise=None):
    """samplers.sample with the sampler chosen at run time: a generic plan (the sampler name
    erased). This path draws ancestral noise at every step for every sampler, so it always needs keys."""
    keys = keys_for(range(x.shape[0])) if keys is None else keys
    return run_static(D.generic_plan(plan), x, keys, ancestral_noise)


@pytest.fixture(params=["static", "run_time"])
def run(request):
    """Every loop test runs with the sampler chosen at trace time and at run time."""
    return {"static": run_static, "run_time": run_kind}[request.param]


def keys_for(seeds):
    return jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))


# ----------------------------------------------------------------------------- schedules

def test_training_alphas_cumprod_bit_equal_diffusers():
    for beta_schedule, lo, hi in [("scaled_linear", 0.00085, 0.012), ("linear", 0.0001, 0.02)]:
        ref = DDIMScheduler(num_train_timesteps=1000, beta_start=lo, beta_end=hi, beta_schedule=beta_schedule)
        ours = S.TrainingSchedule(1000, lo, hi, beta_schedule)
        np.testing.assert_array_equal(ours.betas(), ref.betas.numpy())
        np.testing.assert_array_equal(ours.alphas_cumprod(), ref.alphas_cumprod.numpy())
    # the authors' LDM computes in float64 and stores float32
    b = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    np.testing.assert_array_equal(S.TrainingSchedule().alphas_cumprod("ldm"), np.cumprod(1 - b).astype(np.float32))


def test_training_schedule_from_config():
    cfg = DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1).config
    assert S.TrainingSchedule.from_config(dict(cfg)) == S.TrainingSchedule()
    v = S.TrainingSchedule.from_config({**cfg, "prediction_type": "v_prediction"})   # SD 2.x-style
    assert v == S.TrainingSchedule(prediction_type="v_prediction")
    with pytest.raises(S.ScheduleError, match="prediction_type='sample'"):
        S.TrainingSchedule.from_config({**cfg, "prediction_type": "sample"})
    with pytest.raises(S.ScheduleError, match="beta_schedule"):
        S.TrainingSchedule.from_config({**cfg, "beta_schedule": "squaredcos_cap_v2"})


def test_add_noise_matches_diffusers():
    ref = DDIMScheduler(**SD)
    x0, n = noise(1), noise(2)
    t = np.array([0, 999], np.int64)
    want = ref.add_noise(to_torch(x0), to_torch(n), torch.from_numpy(t))
    got = D.add_noise(S.TrainingSchedule().alphas_cumprod(), jnp.asarray(x0), jnp.asarray(n), jnp.asarray(t))
    np.testing.assert_allclose(np.asarray(got), to_nhwc(want), rtol=1e-6, atol=1e-6)


def authors_kdiffusion_schedule(steps):
    """CompVisDenoiser.get_sigmas(steps) and sigma_to_t, written out from k-diffusion in numpy."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    ac = np.cumprod(1.0 - betas).astype(np.float32).astype(np.float64)  # LDM's float32 buffer
    log_sigmas = np.log(((1 - ac) / ac) ** 0.5)
    t = np.linspace(999, 0, steps)
    lo, hi, w = np.floor(t).astype(int), np.ceil(t).astype(int), t - np.floor(t)
    sigmas = np.exp((1 - w) * log_sigmas[lo] + w * log_sigmas[hi])
    dists = np.log(sigmas) - log_sigmas[:, None]
    low = np.minimum(np.cumsum(dists >= 0, axis=0).argmax(axis=0), len(log_sigmas) - 2)
    ww = np.clip((log_sigmas[low] - np.log(sigmas)) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    timesteps = (1 - ww) * low + ww * (low + 1)
    return np.append(sigmas, 0.0), timesteps


@pytest.mark.parametrize("steps", [1, 7, 100])
def test_kdiffusion_schedule_matches_authors_formula(steps):
    sigmas, timesteps = authors_kdiffusion_schedule(steps)
    plan = D.make_plan("euler_a", steps)
    np.testing.assert_allclose(np.asarray(plan.sigmas), sigmas, rtol=1e-6)
    # fractional timesteps (t = linspace(999, 0, n) up to float32 round trip)
    np.testing.assert_allclose(np.asarray(plan.timesteps), timesteps, rtol=0, atol=2e-4)
    np.testing.assert_allclose(timesteps, np.linspace(999, 0, steps), atol=1e-6)
    assert plan.sigmas[-1] == 0 and np.isclose(float(plan.init_noise_scale), sigmas[0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(plan.input_scale), 1 / np.sqrt(sigmas[:-1] ** 2 + 1), rtol=1e-6)


def test_karras_matches_diffusers():
    # same min/max given explicitly
    ref = EulerDiscreteScheduler(**SD, use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0,
                                 timestep_spacing="linspace", final_sigmas_type="zero")
    ref.set_timesteps(12)
    plan = D.make_plan("euler", 12, "karras", sigma_min=0.1, sigma_max=10.0, alphas_cumprod=ref.alphas_cumprod.numpy())
    np.testing.assert_allclose(np.asarray(plan.sigmas), ref.sigmas.numpy(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(plan.timesteps), ref.timesteps.numpy(), rtol=0, atol=1e-3)
    # default min/max = the training sigmas' extremes; DPM rounds the timesteps
    ref = DPMSolverMultistepScheduler(**SD, use_karras_sigmas=True, timestep_spacing="linspace")
    ref.set_timesteps(12)
    plan = D.make_plan("dpmpp_2m", 12, "karras")
    np.testing.assert_allclose(np.asarray(plan.sigmas), ref.sigmas.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(plan.timesteps), ref.timesteps.numpy())


# ----------------------------------------------------------------------------- full loops vs diffusers

@pytest.mark.parametrize("steps", [10, 50])
def test_ddim_matches_diffusers(run, steps):
    ref = DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                        timestep_spacing="leading", prediction_type="epsilon")
    x = noise(3)
    want = run_diffusers(ref, steps, x)
    plan = D.make_plan("ddim", steps)
    np.testing.assert_array_equal(np.asarray(plan.timesteps), ref.timesteps.numpy())
    assert_loop_matches(run, plan, x, want)


@pytest.mark.parametrize("steps", [10, 30])
def test_euler_matches_diffusers(run, steps):
    ref = EulerDiscreteScheduler(**SD, timestep_spacing="linspace", interpolation_type="linear", steps_offset=0,
                                 use_karras_sigmas=False, final_sigmas_type="zero")
    x = noise(4)
    want = run_diffusers(ref, steps, x)
    plan = D.make_plan("euler", steps, "diffusers")
    np.testing.assert_array_equal(np.asarray(plan.timesteps), ref.timesteps.numpy())
    np.testing.assert_allclose(np.asarray(plan.sigmas), ref.sigmas.numpy(), rtol=1e-6)
    assert_loop_matches(run, plan, x, want)


@pytest.mark.parametrize("steps,schedule", [(10, "diffusers"), (20, "diffusers"), (20, "karras")])
def test_dpmpp_2m_matches_diffusers(run, steps, schedule):
    # default config (dpmsolver++, order 2, midpoint, lower_order_final, final_sigmas_type="zero");
    # 20 steps exercises the path where lower_order_final (< 15 steps) no longer applies.
    ref = DPMSolverMultistepScheduler(**SD, timestep_spacing="linspace", use_karras_sigmas=schedule == "karras")
    x = noise(5)
    want = run_diffusers(ref, steps, x)
    plan = D.make_plan("dpmpp_2m", steps, schedule)
    np.testing.assert_array_equal(np.asarray(plan.timesteps), ref.timesteps.numpy())
    assert_loop_matches(run, plan, x, want)


def test_euler_ancestral_matches_diffusers_with_same_noise(run, monkeypatch):
    steps = 12
    rng = np.random.default_rng(6)
    step_noise = rng.standard_normal((steps,) + SHAPE).astype(np.float32)
    replay = iter([to_torch(z) for z in step_noise])
    monkeypatch.setattr(euler_a_module, "randn_tensor", lambda shape, **kw: next(replay))
    ref = EulerAncestralDiscreteScheduler(**SD, timestep_spacing="linspace", steps_offset=0)
    x = noise(7)
    want = run_diffusers(ref, steps, x)
    assert next(replay, None) is None  # every step drew exactly one noise tensor
    plan = D.make_plan("euler_a", steps, "diffusers")
    assert_loop_matches(run, plan, x, want, ancestral_noise=jnp.asarray(step_noise))
    # the noise matters: a different draw moves the result far beyond the tolerance
    other = run(plan, jnp.asarray(x), ancestral_noise=jnp.asarray(step_noise[::-1]))
    assert np.max(np.abs(np.asarray(other) - want)) > 1e-2


# ----------------------------------------------------------------------------- authors' k-diffusion loops

def kdiffusion_loop(sampler, steps, x, step_noise=None):
    """k-diffusion sample_euler_ancestral / sample_dpmpp_2m with CompVisDenoiser, float64 numpy."""
    sigmas, _ = authors_kdiffusion_schedule(steps)
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    ac = np.cumprod(1.0 - betas).astype(np.float32).astype(np.float64)
    log_sigmas = np.log(((1 - ac) / ac) ** 0.5)
    a, b = A_CH.astype(np.float64), B_CH.astype(np.float64)

    def denoise(x, sigma):
        t = np.interp(np.log(sigma), log_sigmas, np.arange(1000))  # sigma_to_t (log_sigmas ascend)
        eps = a * (x / np.sqrt(sigma ** 2 + 1)) + b * np.sin(t / PERIOD)
        return x - sigma * eps

    x = x.astype(np.float64) * sigmas[0]
    old = None
    for i in range(steps):
        s, s_next = sigmas[i], sigmas[i + 1]
        den = denoise(x, s)
        if sampler == "euler_a":
            up = min(s_next, np.sqrt(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2))
            down = np.sqrt(s_next ** 2 - up ** 2)
            x = x + (x - den) / s * (down - s)
            if s_next > 0:
                x = x + step_noise[i] * up
        else:  # dpmpp_2m
            h = np.log(s) - np.log(s_next) if s_next > 0 else np.inf
            if old is None or s_next == 0:
                x = (s_next / s) * x - np.expm1(-h) * den
            else:
                r = (np.log(sigmas[i - 1]) - np.log(s)) / h
                x = (s_next / s) * x - np.expm1(-h) * ((1 + 1 / (2 * r)) * den - 1 / (2 * r) * old)
            old = den
    return x


def test_euler_ancestral_matches_authors_kdiffusion(run):
    steps = 15
    step_noise = np.random.default_rng(8).standard_normal((steps,) + SHAPE).astype(np.float32)
    x = noise(9)
    want = kdiffusion_loop("euler_a", steps, x, step_noise)
    assert_loop_matches(run, D.make_plan("euler_a", steps), x, want, ancestral_noise=jnp.asarray(step_noise))


def test_dpmpp_2m_matches_authors_kdiffusion(run):
    x = noise(10)
    want = kdiffusion_loop("dpmpp_2m", 16, x)
    plan = D.make_plan("dpmpp_2m", 16, "kdiffusion")
    assert_loop_matches(run, plan, x, want)
    # the second-order history term matters: dropping it misses by far more than the tolerance
    first_order = samplers.with_coefficients(plan.replace(history_weight=jnp.zeros_like(plan.history_weight)))
    assert rel_err(run(first_order, jnp.asarray(x)), want) > 20 * RTOL_SCALE


# ----------------------------------------------------------------------------- keys, batches, jit

def test_euler_ancestral_keys_reproducible_and_batch_independent(run):
    plan = D.make_plan("euler_a", 8)
    x3 = jnp.asarray(noise(11, (3,) + SHAPE[1:]))
    keys3 = keys_for([5, 6, 7])
    first = np.asarray(run(plan, x3, keys3))
    np.testing.assert_array_equal(first, np.asarray(run(plan, x3, keys3)))
    alone = np.asarray(run(plan, x3[1:2], keys3[1:2]))
    np.testing.assert_allclose(alone[0], first[1], rtol=0, atol=1e-6)
    # the key drives the noise: another key for example 1 changes only example 1
    other = np.asarray(run(plan, x3, keys_for([5, 99, 7])))
    np.testing.assert_allclose(other[[0, 2]], first[[0, 2]], rtol=0, atol=1e-6)
    assert np.max(np.abs(other[1] - first[1])) > 1e-2


def test_sample_needs_keys_for_ancestral_noise():
    x3 = jnp.asarray(noise(11, (3,) + SHAPE[1:]))
    with pytest.raises(ValueError, match="euler_a: needs per-example PRNG keys"):
        D.sample(eps_jax, x3, D.make_plan("euler_a", 8))
    generic = D.generic_plan(D.make_plan("ddim", 8))   # at run time any sampler may be euler_a
    with pytest.raises(ValueError, match="run time: needs per-example PRNG keys"):
        D.sample(eps_jax, x3, generic)
    with pytest.raises(ValueError, match="2 keys for a batch of 3"):
        D.sample(eps_jax, x3, generic, keys_for([1, 2]))


def test_run_time_kind_serves_every_sampler_with_one_trace():
    """The pipeline's case: one compiled loop, the sampler run-time data (coefficients of one
    formula, no branch); each gives what the static loop gives for that sampler (a deterministic
    sampler's noise enters times 0)."""
    traces = []

    @jax.jit
    def f(plan, x, keys):
        traces.append(1)
        return D.sample(eps_jax, x, plan, keys)

    x, keys = jnp.asarray(noise(17)), keys_for([3, 4])
    outs = {}
    for sampler in D.SAMPLERS:
        plan = D.make_plan(sampler, 6)
        generic = D.generic_plan(plan)
        assert generic.sampler == D.ANY
        outs[sampler] = np.asarray(f(generic, x, keys))
        np.testing.assert_allclose(outs[sampler], np.asarray(run_static(plan, x, keys)), rtol=0, atol=1e-5)
    assert len(traces) == 1
    assert not any(e.primitive.name == "cond" for e in jax.make_jaxpr(f)(generic, x, keys).jaxpr.eqns)
    # the kind really selects: every two samplers give clearly different latents
    vals = list(outs.values())
    assert min(np.max(np.abs(a - b)) for k, a in enumerate(vals) for b in vals[k + 1:]) > 1e-2


@pytest.mark.parametrize("selection", ["static", "run_time"])
def test_eps_fn_receives_the_step_index(selection):
    """eps_fn(model_input, timestep, i) gets step i (the pair stage's injection schedule needs it):
    an eps that depends on i gives what a Python loop of samplers.step passing i gives."""
    plan = D.make_plan("euler", 5, "kdiffusion")
    x, keys = jnp.asarray(noise(18)), keys_for([0, 1])

    def eps_with_step(xin, t, i):
        return eps_jax(xin, t, i) + 0.1 * jnp.asarray(i, jnp.float32)

    if selection == "static":
        got = jax.jit(lambda p, x: D.sample(eps_with_step, x, p))(plan, x)
    else:
        got = jax.jit(lambda p, x, keys: D.sample(eps_with_step, x, p, keys))(D.generic_plan(plan), x, keys)
    state = D.init_state(plan, x)
    for i in range(plan.steps):
        state = D.step(plan, state, i, eps_with_step(D.model_input(plan, state, i), plan.timesteps[i], i))
    np.testing.assert_allclose(np.asarray(got), np.asarray(state.x), rtol=0, atol=1e-5)
    assert np.max(np.abs(np.asarray(got) - np.asarray(run_static(plan, x)))) > 1e-2


def test_plan_is_a_jit_argument_without_retracing():
    traces = []

    @jax.jit
    def f(plan, x):
        traces.append(1)
        return D.sample(eps_jax, x, plan)

    x = jnp.asarray(noise(12))
    a = f(D.make_plan("euler", 6, "kdiffusion"), x)
    b = f(D.make_plan("euler", 6, "karras"), x)
    assert len(traces) == 1 and not np.allclose(a, b)


def test_plan_errors():
    with pytest.raises(S.ScheduleError, match="unknown sampler 'heun'"):
        D.make_plan("heun", 10)
    with pytest.raises(S.ScheduleError, match="ddim: schedule 'karras'"):
        D.make_plan("ddim", 10, "karras")
    with pytest.raises(S.ScheduleError, match="positive integer"):
        D.make_plan("euler", 0)
    with pytest.raises(S.ScheduleError, match="outside the 1000 training timesteps"):
        D.make_plan("ddim", 1000)


# ----------------------------------------------------------------------------- guidance

def test_combine_formula_with_per_example_scales():
    rng = np.random.default_rng(13)
    eps3 = rng.standard_normal((3 * 2, 3, 3, 4)).astype(np.float32)
    s_t, s_i = np.array([7.5, 3.0], np.float32), np.array([1.5, 1.2], np.float32)
    got = jax.jit(D.combine)(jnp.asarray(eps3), jnp.asarray(s_t), jnp.asarray(s_i))
    for b in range(2):
        e_cond, e_img, e_unc = eps3[3 * b], eps3[3 * b + 1], eps3[3 * b + 2]
        want = e_unc + s_t[b] * (e_cond - e_img) + s_i[b] * (e_img - e_unc)
        np.testing.assert_allclose(np.asarray(got[b]), want, rtol=1e-6, atol=1e-6)
    scalar = D.combine(jnp.asarray(eps3), 7.5, 1.5)
    np.testing.assert_allclose(np.asarray(scalar[0]), np.asarray(got[0]), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="text_scale has 3 values for a batch of 2"):
        D.combine(jnp.asarray(eps3), jnp.ones(3), 1.5)


def test_expand_interleaves_each_example_with_its_own_rows():
    rng = np.random.default_rng(14)
    lat, img = (rng.standard_normal((3, 2, 2, 4)).astype(np.float32) for _ in range(2))
    cond = rng.standard_normal((3, 5, 8)).astype(np.float32)
    null = rng.standard_normal((5, 8)).astype(np.float32)
    expand = jax.jit(D.expand)
    x3, text3 = expand(lat, img, cond, null)
    assert x3.shape == (9, 2, 2, 8) and text3.shape == (9, 5, 8)
    xs, ts = np.asarray(D.split_branches(x3)), np.asarray(D.split_branches(text3))
    for b in range(3):
        np.testing.assert_array_equal(xs[b, ..., :4], np.stack([lat[b]] * 3))
        np.testing.assert_array_equal(xs[b, ..., 4:], np.stack([img[b], img[b], np.zeros_like(img[b])]))
        np.testing.assert_array_equal(ts[b], np.stack([cond[b], null, null]))
        # the rows a device holding only example b needs are those expand makes from example b alone
        one_x, one_t = expand(lat[b:b + 1], img[b:b + 1], cond[b:b + 1], null)
        np.testing.assert_array_equal(xs[b], np.asarray(one_x))
        np.testing.assert_array_equal(ts[b], np.asarray(one_t))


def test_guided_eps_fn_formula_and_per_example_sampling():
    """guided_eps_fn is the dual-guidance formula over the model's three branches, and sampling
    a batch with it equals sampling each example alone with its own scales."""
    rng = np.random.default_rng(15)
    img = jnp.asarray(rng.standard_normal((2, 3, 3, 4)), jnp.float32)
    cond = jnp.asarray(rng.standard_normal((2, 6, 4)), jnp.float32)
    null = jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)

    def model_fn(x, t, text, i):  # depends on every input; (3B, h, w, 8) -> (3B, h, w, 4)
        text_term = text.mean(axis=1)[:, None, None, :] * jnp.cos(t / 300)[:, None, None, None]
        return 0.3 * x[..., :4] - 0.2 * x[..., 4:] + text_term

    x = jnp.asarray(noise(16, (2, 3, 3, 4)))
    s_t, s_i = jnp.array([7.5, 6.0]), jnp.array([1.5, 1.8])
    # one call: the three branches, then the formula
    t = jnp.float32(500.0)
    call = lambda lat, emb: model_fn(lat, jnp.full((2,), t), emb, 0)
    e_cond = call(jnp.concatenate([x, img], -1), cond)
    e_img = call(jnp.concatenate([x, img], -1), jnp.broadcast_to(null, cond.shape))
    e_unc = call(jnp.concatenate([x, jnp.zeros_like(img)], -1), jnp.broadcast_to(null, cond.shape))
    sc = lambda s: s[:, None, None, None]
    want = e_unc + sc(s_t) * (e_cond - e_img) + sc(s_i) * (e_img - e_unc)
    got = D.guided_eps_fn(model_fn, img, cond, null, s_t, s_i)(x, t, 0)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)

    plan = D.make_plan("dpmpp_2m", 5)
    run = jax.jit(lambda img, cond, s_t, s_i, x: D.sample(
        D.guided_eps_fn(model_fn, img, cond, null, s_t, s_i), x, plan))
    both = np.asarray(run(img, cond, s_t, s_i, x))
    for b in range(2):
        sl = slice(b, b + 1)
        alone = np.asarray(run(img[sl], cond[sl], s_t[sl], s_i[sl], x[sl]))
        np.testing.assert_allclose(alone[0], both[b], rtol=0, atol=1e-5)
    assert np.max(np.abs(both[0] - both[1])) > 1e-2
