"""Samplers (euler_a, euler, dpmpp_2m, ddim; edm_euler) as a plan of arrays plus pure, jit-able steps.

    plan = make_plan("euler_a", steps=20)                    # host, numpy; once per setting
    x0 = sample(eps_fn, noise, plan, keys)                   # inside jit; lax.fori_loop
    x0 = sample(eps_fn, noise, generic_plan(plan), keys)     # or: one compile for every sampler

`sample` is the package's one sampling loop: the edit pipeline and the pair stage both run it.
`eps_fn(model_input, timestep, i) -> output` (the model's eps, or v for v-prediction models)
sees the noisy latents already scaled for the model, a scalar float32 UNet timestep and the int32
step index i (the pair stage's prompt-to-prompt schedule needs it; most eps functions ignore it).
`noise` is standard normal: the sampler multiplies it by its initial noise scale (diffusers'
`latents * init_noise_sigma`). `keys` holds one PRNG key
per example: ancestral noise of example b at step i is normal(fold_in(keys[b], i)), so an
example's result never depends on the rest of the batch.

Sigma-space samplers keep x = x0 + sigma * eps (k-diffusion's convention; EDM's too); DDIM keeps
the diffusers variance-preserving sample. The model output is first made an eps,
    eps = ex x + eo output     (epsilon models: ex = 0, eo = 1; v-prediction and EDM: see
                                _eps_conversion), then every sampler step is one linear formula,
    x' = cx x + ce eps + cp previous_denoised + cn noise,   denoised = x - sigma eps,
whose per-step coefficients are computed on the host in float64 (from the schedule alone) and
stored in the plan as float32: the loop body has no branch on the sampler, and a plan whose
sampler name is erased (`generic_plan`) runs any of them in one compiled loop.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ip2p_jax.diffusion import schedules as sch
from ip2p_jax.diffusion.schedules import EDMSchedule, ScheduleError, TrainingSchedule

DDPM_SAMPLERS = ("euler_a", "euler", "dpmpp_2m", "ddim")   # models trained on DDPM betas (TrainingSchedule)
EDM_SAMPLERS = ("edm_euler",)                               # models trained in EDM sigmas (EDMSchedule: CosXL)
SAMPLERS = DDPM_SAMPLERS + EDM_SAMPLERS
ANY = "any"   # generic_plan's sampler name: the coefficients say which sampler runs
SIGMA_SCHEDULES = ("kdiffusion", "diffusers", "karras")
EDM_SCHEDULES = sch.EDM_SIGMA_SCHEDULES
DEFAULT_SCHEDULE = {"euler_a": "kdiffusion", "euler": "kdiffusion", "dpmpp_2m": "diffusers", "ddim": "diffusers",
                    "edm_euler": sch.COSXL.sigma_schedule}   # edm_euler: the model's own (default_schedule)

EpsFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]   # (model_input, timestep, step index) -> output
NoiseSchedule = TrainingSchedule | EDMSchedule


@struct.dataclass
class Plan:
    """Everything a sampler needs per step, as arrays (n = steps). Pass it into jit freely.

    timesteps:        (n,) UNet timestep per step (fractional for kdiffusion/karras-Euler; EDM's
                      c_noise = 0.25 log(sigma) for edm_euler).
    sigmas:           (n+1,) noise level (sigma units) before each step, then after the last.
    input_scale:      (n,) factor applied to x to make the model input (1/sqrt(sigma^2+1); DDIM 1;
                      EDM's c_in = 1/sqrt(sigma^2+sigma_data^2)).
    init_noise_scale: () standard normal noise times this is the starting x.
    sigma_down, sigma_up: (n,) Euler target sigma and ancestral noise std (euler: sigma_up = 0).
    history_weight:   (n,) DPM++ 2M weight w: denoised' = (1+w) denoised - w previous_denoised.
    alphas_cumprod:   (n+1,) DDIM alpha-bar at each step's timestep, then the final one.
    cx, ce, cp, cn:   (n,) the step formula's coefficients (module docstring).
    eps_from_x, eps_from_output: (n,) the model output's conversion eps = ex x + eo output
                      (the model's prediction type; epsilon models: 0 and 1).
    Fields a sampler does not use are zeros; `sampler` is static (part of the tree structure).
    """

    sampler: str = struct.field(pytree_node=False)
    timesteps: jax.Array
    sigmas: jax.Array
    input_scale: jax.Array
    init_noise_scale: jax.Array
    sigma_down: jax.Array
    sigma_up: jax.Array
    history_weight: jax.Array
    alphas_cumprod: jax.Array
    cx: jax.Array
    ce: jax.Array
    cp: jax.Array
    cn: jax.Array
    eps_from_x: jax.Array
    eps_from_output: jax.Array

    @property
    def steps(self) -> int:
        return self.timesteps.shape[0]


@struct.dataclass
class SamplerState:
    x: jax.Array               # (B, ...) float32 current sample
    prev_denoised: jax.Array   # (B, ...) float32 previous x0 prediction (DPM++ 2M; zeros otherwise)


# ----------------------------------------------------------------------------- planning (host)

def make_plan(sampler: str, steps: int, schedule: str | None = None, *,
              training: NoiseSchedule | None = None, alphas_cumprod: np.ndarray | None = None,
              eta: float = 1.0, sigma_min: float | None = None, sigma_max: float | None = None,
              steps_offset: int = 1) -> Plan:
    """Plan `steps` steps of `sampler` ("euler_a", "euler", "dpmpp_2m", "ddim"; "edm_euler").

    schedule (sigma-space samplers): "kdiffusion" (the authors' CompVisDenoiser.get_sigmas;
      default for euler/euler_a), "diffusers" (that sampler's diffusers scheduler with SD
      settings; default for dpmpp_2m), "karras" (rho 7 between sigma_min and sigma_max, default
      the training sigmas' extremes). DDIM has one schedule, diffusers' SD config ("diffusers":
      leading spacing, `steps_offset`, set_alpha_to_one=False, eta 0, no clipping).
    training: the model's noise schedule, with its prediction type (the plan converts the model
      output). DDPM samplers need a TrainingSchedule (default SD's scaled_linear 0.00085..0.012,
      1000, epsilon); edm_euler an EDMSchedule (default schedules.COSXL): diffusers'
      EDMEulerScheduler, Euler steps without churn; schedule "karras" or "exponential" (default
      the model's sigma_schedule).
    alphas_cumprod: override the (T,) float32 alpha-bars; by default they are computed the way
      the chosen schedule's reference does ("ldm" precision for kdiffusion, else "diffusers").
    eta: ancestral noise amount for euler_a (k-diffusion's eta; 1 = diffusers).
    """
    if sampler not in SAMPLERS:
        raise ScheduleError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    check_names(sampler, steps, schedule)
    if sampler in EDM_SAMPLERS:
        edm = sch.COSXL if training is None else training
        if not isinstance(edm, EDMSchedule):
            raise ScheduleError(f"{sampler} samples EDM-trained models (scheduler {sch.EDM_SCHEDULERS[0]}, e.g. "
                                f"CosXL); this model has a DDPM (betas) schedule: use one of {DDPM_SAMPLERS}")
        return _edm_plan(steps, schedule or edm.sigma_schedule, edm)
    training = training or TrainingSchedule()
    if not isinstance(training, TrainingSchedule):
        raise ScheduleError(f"{sampler} needs a model trained on DDPM betas; this model has an EDM schedule "
                            f"(CosXL-style): use {' or '.join(EDM_SAMPLERS)}")
    schedule = schedule or DEFAULT_SCHEDULE[sampler]
    if not 0.0 <= eta <= 1.0:
        raise ScheduleError(f"{sampler}: eta must be in [0, 1], got {eta}")
    if alphas_cumprod is None:
        ac = training.alphas_cumprod("ldm" if schedule == "kdiffusion" else "diffusers")
    else:
        ac = np.asarray(alphas_cumprod, dtype=np.float32)
        if ac.ndim != 1 or ac.shape[0] < 2:
            raise ScheduleError(f"{sampler}: alphas_cumprod must be a 1-D array of the training timesteps, "
                                f"got shape {ac.shape}")
    if sampler == "ddim":
        return _ddim_plan(steps, ac, steps_offset, training.prediction_type)
    return _sigma_plan(sampler, steps, schedule, ac, eta, sigma_min, sigma_max, training.prediction_type)


def check_names(sampler: str | None, steps: int, schedule: str | None = None) -> None:
    """ScheduleError unless `sampler`, `steps` and `schedule` are valid names and values (any model;
    sampler None: the model's default, so any sampler's schedule name is valid)."""
    if sampler is not None and sampler not in SAMPLERS:
        raise ScheduleError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ScheduleError(f"{sampler or 'sampler'}: steps must be a positive integer, got {steps!r}")
    allowed = (SIGMA_SCHEDULES + EDM_SCHEDULES if sampler is None else ("diffusers",) if sampler == "ddim"
               else EDM_SCHEDULES if sampler in EDM_SAMPLERS else SIGMA_SCHEDULES)
    if schedule is not None and schedule not in allowed:
        raise ScheduleError(f"{sampler or 'sampler'}: schedule {schedule!r} is not one of {allowed}")


def default_sampler(training: NoiseSchedule | None = None) -> str:
    """The sampler a model's edits use unless told otherwise: edm_euler for EDM models, else euler_a."""
    return EDM_SAMPLERS[0] if isinstance(training, EDMSchedule) else "euler_a"


def default_schedule(sampler: str, training: NoiseSchedule | None = None) -> str:
    """The schedule make_plan uses for `sampler` when none is given (edm_euler: the model's own)."""
    if sampler in EDM_SAMPLERS and isinstance(training, EDMSchedule):
        return training.sigma_schedule
    return DEFAULT_SCHEDULE[sampler]


def _sigma_plan(sampler, steps, schedule, ac, eta, sigma_min, sigma_max, prediction_type) -> Plan:
    train_sigmas = sch.sigmas_from_alphas_cumprod(ac)
    n_train = len(ac)
    if schedule == "kdiffusion":
        sigmas, timesteps = sch.kdiffusion_sigmas(steps, train_sigmas)
    elif schedule == "diffusers" and sampler == "dpmpp_2m":
        timesteps = sch.diffusers_dpm_timesteps(steps, n_train).astype(np.float64)
        sigmas = np.append(train_sigmas.astype(np.float32)[timesteps.astype(np.int64)].astype(np.float64), 0.0)
    elif schedule == "diffusers":
        sigmas, timesteps = sch.diffusers_euler_sigmas(steps, train_sigmas)
    else:  # karras
        lo = train_sigmas[0] if sigma_min is None else sigma_min
        hi = train_sigmas[-1] if sigma_max is None else sigma_max
        if not 0 < lo < hi:
            raise ScheduleError(f"{sampler}: karras needs 0 < sigma_min < sigma_max, got {lo}, {hi}")
        # diffusers works with the float32 sigma values, as .item() of float32 arrays.
        sigmas = sch.karras_sigmas(steps, float(np.float32(lo)), float(np.float32(hi))).astype(np.float32)
        timesteps = sch.sigma_to_t(sigmas, train_sigmas)
        if sampler == "dpmpp_2m":  # diffusers' DPM rounds Karras timesteps to integers
            timesteps = timesteps.round()
        sigmas = np.append(sigmas.astype(np.float64), 0.0)

    s, s_next = sigmas[:-1], sigmas[1:]
    sigma_down, sigma_up = s_next, np.zeros(steps)
    if sampler == "euler_a":
        sigma_up = np.minimum(s_next, eta * np.sqrt(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2))
        sigma_down = np.sqrt(s_next ** 2 - sigma_up ** 2)
    history = np.zeros(steps)
    if sampler == "dpmpp_2m" and steps > 2:
        # Second order on steps 1..n-2; the first step has no history and the last (to sigma 0)
        # is first order (diffusers: lower_order_final / final_sigmas_type="zero"; k-diffusion alike).
        h = np.log(s[1:-1] / s_next[1:-1])
        h_last = np.log(s[:-2] / s[1:-1])
        history[1:-1] = h / (2.0 * h_last)
    if sampler == "dpmpp_2m" and schedule != "kdiffusion":
        init = np.sqrt(sigmas[0] ** 2 + 1.0)   # diffusers starts the VP sample at unit variance
    else:
        init = sigmas[0]                        # k-diffusion and diffusers' Euler: x = noise * sigma_max
    return _plan(sampler, timesteps, sigmas, 1.0 / np.sqrt(s ** 2 + 1.0), init,
                 sigma_down=sigma_down, sigma_up=sigma_up, history_weight=history,
                 **_eps_conversion(prediction_type, s))


def _ddim_plan(steps, ac, steps_offset, prediction_type) -> Plan:
    timesteps, ratio = sch.ddim_timesteps(steps, len(ac), steps_offset)
    prev = timesteps[-1] - ratio
    final = ac[prev] if prev >= 0 else ac[0]  # set_alpha_to_one=False
    alphas = np.append(ac[timesteps], final)
    return _plan("ddim", timesteps, sch.sigmas_from_alphas_cumprod(alphas), np.ones(steps), 1.0,
                 alphas_cumprod=alphas, **_eps_conversion(prediction_type, alphas_cumprod=alphas[:-1]))


def _edm_plan(steps, schedule, edm: EDMSchedule) -> Plan:
    """diffusers' EDMEulerScheduler (s_churn 0): Euler in x = x0 + sigma eps with EDM's
    preconditioning; the schedule's float32 sigmas, as diffusers steps with them."""
    sig32 = edm.sigmas(steps, schedule)
    timesteps = np.float32(0.25) * np.log(sig32)                  # c_noise, float32 as diffusers
    last = sig32[-1] if edm.final_sigmas_type == "sigma_min" else 0.0
    sigmas = np.append(sig32.astype(np.float64), last)
    s, sd = sigmas[:-1], float(edm.sigma_data)
    init = np.sqrt(float(edm.sigma_max) ** 2 + 1.0)                # diffusers' init_noise_sigma
    return _plan("edm_euler", timesteps, sigmas, 1.0 / np.sqrt(s ** 2 + sd ** 2), init, sigma_down=sigmas[1:],
                 **_eps_conversion(edm.prediction_type, s, sigma_data=sd, edm=True))


def _eps_conversion(prediction_type, sigma=None, *, alphas_cumprod=None, sigma_data=1.0, edm=False) -> dict:
    """eps_from_x, eps_from_output (float64) with eps = ex x + eo output, per step.

    Sigma space (x = x0 + sigma eps): the model's denoised is c_skip x + c_out output with
    c_skip = sd^2 / (sigma^2 + sd^2) and c_out = -sigma sd / sqrt(sigma^2 + sd^2) for v (diffusers'
    Euler schedulers: sd = 1; EDM: sigma_data), +sigma sd / sqrt(.) for EDM "epsilon", so
    eps = (x - denoised) / sigma = sigma / (sigma^2 + sd^2) x - (c_out / sigma) output.
    DDIM (x the VP sample, a = alpha-bar): v gives eps = sqrt(1 - a) x + sqrt(a) v.
    """
    if alphas_cumprod is not None:
        a = np.asarray(alphas_cumprod, np.float64)
        if prediction_type == "v_prediction":
            return {"eps_from_x": np.sqrt(1.0 - a), "eps_from_output": np.sqrt(a)}
        return {"eps_from_x": np.zeros_like(a), "eps_from_output": np.ones_like(a)}
    s = np.asarray(sigma, np.float64)
    if prediction_type == "epsilon" and not edm:
        return {"eps_from_x": np.zeros_like(s), "eps_from_output": np.ones_like(s)}
    norm = np.sqrt(s ** 2 + sigma_data ** 2)
    c_out_over_sigma = (-1.0 if prediction_type == "v_prediction" else 1.0) * sigma_data / norm
    return {"eps_from_x": s / norm ** 2, "eps_from_output": -c_out_over_sigma}


def _plan(sampler, timesteps, sigmas, input_scale, init, *, eps_from_x, eps_from_output, **fields) -> Plan:
    n = len(timesteps)
    f32 = lambda a: jnp.asarray(np.asarray(a, dtype=np.float64).astype(np.float32))
    defaults = {"sigma_down": np.zeros(n), "sigma_up": np.zeros(n), "history_weight": np.zeros(n),
                "alphas_cumprod": np.zeros(n + 1)}
    defaults.update(fields)
    coefs = _coefficients(sampler, np.asarray(sigmas, np.float64), defaults)
    conversion = {"eps_from_x": eps_from_x, "eps_from_output": eps_from_output}
    return Plan(sampler=sampler, timesteps=f32(timesteps), sigmas=f32(sigmas), input_scale=f32(input_scale),
                init_noise_scale=f32(init), **{k: f32(v) for k, v in {**defaults, **coefs, **conversion}.items()})


def with_coefficients(plan: Plan) -> Plan:
    """The plan with cx, ce, cp, cn recomputed from its schedule fields (after editing them); the
    model output's conversion (eps_from_x, eps_from_output) is kept as planned."""
    if plan.sampler not in SAMPLERS:
        raise ValueError(f"with_coefficients needs a named sampler, got {plan.sampler!r}")
    fields = {k: np.asarray(getattr(plan, k), np.float64)
              for k in ("sigma_down", "sigma_up", "history_weight", "alphas_cumprod")}
    coefs = _coefficients(plan.sampler, np.asarray(plan.sigmas, np.float64), fields)
    return plan.replace(**{k: jnp.asarray(v.astype(np.float32)) for k, v in coefs.items()})


def _coefficients(sampler, sigmas, f) -> dict:
    """cx, ce, cp, cn of each step (float64), from the sampler's own update rule."""
    s, s_next = sigmas[:-1], sigmas[1:]
    n = len(s)
    zero, one = np.zeros(n), np.ones(n)
    if sampler in ("euler", "euler_a", "edm_euler"):
        # Euler along d = (x - denoised) / sigma = eps, to sigma_down; then sigma_up noise.
        return {"cx": one, "ce": np.asarray(f["sigma_down"], np.float64) - s, "cp": zero,
                "cn": np.asarray(f["sigma_up"], np.float64)}
    if sampler == "dpmpp_2m":
        # x' = r x + (1 - r) ((1 + w) denoised - w prev), r = sigma_next / sigma = exp(-h)
        w = np.asarray(f["history_weight"], np.float64)
        r = s_next / s
        return {"cx": r + (1 - r) * (1 + w), "ce": -(1 - r) * (1 + w) * s, "cp": -(1 - r) * w, "cn": zero}
    # ddim, eta 0: x0 = (x - sqrt(1 - a) eps) / sqrt(a); x' = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps
    ac = np.asarray(f["alphas_cumprod"], np.float64)
    a, a_prev = ac[:-1], ac[1:]
    return {"cx": np.sqrt(a_prev / a), "ce": np.sqrt(1 - a_prev) - np.sqrt(a_prev * (1 - a) / a), "cp": zero,
            "cn": zero}


# ----------------------------------------------------------------------------- steps (jit-able)

def init_state(plan: Plan, noise: jax.Array) -> SamplerState:
    x = noise.astype(jnp.float32) * plan.init_noise_scale
    return SamplerState(x=x, prev_denoised=jnp.zeros_like(x))


def model_input(plan: Plan, state: SamplerState, i) -> jax.Array:
    """The noisy half of the UNet input at step i (float32)."""
    return state.x * plan.input_scale[i]


def is_ancestral(plan: Plan) -> bool:
    """Whether the loop draws ancestral noise: euler_a, and a generic plan (any sampler may be it)."""
    return plan.sampler in ("euler_a", ANY)


def step_noise(keys: jax.Array, i, shape: tuple[int, ...]) -> jax.Array:
    """Ancestral noise for step i: row b is normal(fold_in(keys[b], i), shape) (float32)."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), shape, jnp.float32))(keys)


def step(plan: Plan, state: SamplerState, i, output: jax.Array, noise: jax.Array | None = None) -> SamplerState:
    """Advance from step i to i+1 given the model's output at step i (eps, or v for v-prediction
    models; and ancestral noise for euler_a): the one formula of the module docstring, whatever
    the sampler and prediction type."""
    x = state.x
    eps = plan.eps_from_x[i] * x + plan.eps_from_output[i] * output.astype(jnp.float32)
    new = plan.cx[i] * x + plan.ce[i] * eps + plan.cp[i] * state.prev_denoised
    if is_ancestral(plan):
        if noise is None:
            raise ValueError(f"{plan.sampler}: step needs ancestral noise")
        new = new + plan.cn[i] * noise.astype(jnp.float32)
    return SamplerState(x=new, prev_denoised=x - plan.sigmas[i] * eps)


def generic_plan(plan: Plan) -> Plan:
    """The plan with its sampler name erased (ANY): one compiled loop serves every sampler of the
    same step count, with no branch (the coefficients differ, the formula does not). The loop then
    draws ancestral noise at every step (multiplied by cn = 0 for the deterministic samplers)."""
    return plan.replace(sampler=ANY)


def sample(eps_fn: EpsFn, noise: jax.Array, plan: Plan, keys: jax.Array | None = None, *,
           ancestral_noise: jax.Array | None = None,
           after_step: Callable[[jax.Array, jax.Array], jax.Array] | None = None) -> jax.Array:
    """Run all plan steps with lax.fori_loop; returns the final latents (float32, noise's shape).

    keys: (B,) PRNG keys (typed or raw uint32 (B, 2)), needed by euler_a and generic plans unless
    `ancestral_noise` (steps, B, ...) gives the per-step noise explicitly.
    after_step: optional `(i, x) -> x` applied to the sample after step i (e.g. the masked edit's
    blend, diffusion/masking.py); the sampler's history (previous denoised) is left as it was.
    """
    batch, shape = noise.shape[0], noise.shape[1:]
    needs_noise = is_ancestral(plan)
    name = "sampler chosen at run time" if plan.sampler == ANY else plan.sampler
    if needs_noise and ancestral_noise is None:
        if keys is None:
            raise ValueError(f"{name}: needs per-example PRNG keys (or ancestral_noise)")
        if keys.shape[0] != batch:
            raise ValueError(f"{name}: {keys.shape[0]} keys for a batch of {batch}")
    if ancestral_noise is not None and ancestral_noise.shape != (plan.steps,) + noise.shape:
        raise ValueError(f"{name}: ancestral_noise has shape {ancestral_noise.shape}, "
                         f"expected {(plan.steps,) + noise.shape}")

    def body(i, state):
        output = eps_fn(model_input(plan, state, i), plan.timesteps[i], i)
        z = None
        if needs_noise:
            z = ancestral_noise[i] if ancestral_noise is not None else step_noise(keys, i, shape)
        new = step(plan, state, i, output, z)
        return new if after_step is None else new.replace(x=after_step(i, new.x))

    return jax.lax.fori_loop(0, plan.steps, body, init_state(plan, noise)).x
