"""Noise schedules: the model's training schedule and the sigma/timestep schedules samplers use.

A model is trained either on DDPM's discrete betas (`TrainingSchedule`: SD 1.x/2.x, InstructPix2Pix)
or in EDM's continuous sigma parametrisation (`EDMSchedule`: CosXL); `noise_schedule_from_config`
reads whichever a diffusers scheduler config describes. Both carry the model's prediction type
("epsilon" or "v_prediction"), which the samplers convert with per-step plan data.

Everything here runs once on the host in numpy (float64 where we compute, float32 where a
reference stores float32), except `add_noise`, which is jit-able.

Vocabulary: a training timestep t in [0, T) has alphas_cumprod ac[t]; its noise level in
"sigma" (variance-exploding) units is sigma[t] = sqrt((1 - ac[t]) / ac[t]). A sigma-space
sampler holds x = x0 + sigma * eps and feeds the model x / sqrt(sigma^2 + 1).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from ip2p_jax.errors import Ip2pError

BETA_SCHEDULES = ("scaled_linear", "linear")
# Where the float32 alphas_cumprod comes from: diffusers computes betas in float32 torch;
# the authors' LatentDiffusion (CompVis) computes in float64 and stores float32.
REFERENCES = ("diffusers", "ldm")
PREDICTION_TYPES = ("epsilon", "v_prediction")
EDM_SCHEDULERS = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")   # configs of EDM-trained models
EDM_SIGMA_SCHEDULES = ("karras", "exponential")
# Schedulers of other parametrisations (cosine-continuous, flow matching): refused, not misread as DDPM.
UNSUPPORTED_SCHEDULERS = ("CosineDPMSolverMultistepScheduler", "FlowMatchEulerDiscreteScheduler",
                          "FlowMatchHeunDiscreteScheduler")


class ScheduleError(Ip2pError):
    """A schedule or sampler setting that is unknown, unsupported or out of range."""


@dataclasses.dataclass(frozen=True)
class TrainingSchedule:
    """The DDPM forward process the UNet was trained with (SD 1.x / InstructPix2Pix defaults)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"   # or "v_prediction" (SD 2.x-style models)

    def __post_init__(self):
        _check_prediction_type(self.prediction_type)
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ScheduleError(f"beta_schedule {self.beta_schedule!r} is not supported; "
                                f"choose one of {BETA_SCHEDULES}")
        if self.num_train_timesteps < 2:
            raise ScheduleError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise ScheduleError(f"need 0 < beta_start <= beta_end < 1, got {self.beta_start}, {self.beta_end}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, source: str = "scheduler config") -> "TrainingSchedule":
        """Read the training-schedule facts from a diffusers scheduler config dict.

        Sampler choices in the dict (timestep_spacing, steps_offset, ...) are ignored: the
        sampler plan chooses those explicitly. prediction_type "epsilon" and "v_prediction" are
        read; other settings that change the model's meaning (sample prediction, zero-terminal-SNR
        rescaling, custom betas) and EDM configs (see noise_schedule_from_config) are refused.
        """
        _check_scheduler_class(config, source, edm=False)
        refused = {
            "prediction_type": PREDICTION_TYPES + (None,),
            "rescale_betas_zero_snr": (False, None),
            "trained_betas": (None,),
            "thresholding": (False, None),
        }
        bad = [f"{k}={config[k]!r}" for k, ok in refused.items() if k in config and config[k] not in ok]
        if bad:
            raise ScheduleError(f"{source}: unsupported settings: {', '.join(bad)}")
        kwargs = {f.name: config[f.name] for f in dataclasses.fields(cls) if config.get(f.name) is not None}
        try:
            return cls(**kwargs)
        except ScheduleError as e:
            raise ScheduleError(f"{source}: {e}") from None

    def betas(self, reference: str = "diffusers") -> np.ndarray:
        """Betas as the reference computes them (float32 for diffusers, float64 for ldm)."""
        _check_reference(reference)
        lo, hi, n = self.beta_start, self.beta_end, self.num_train_timesteps
        if self.beta_schedule == "scaled_linear":
            lo, hi = lo ** 0.5, hi ** 0.5
        if reference == "diffusers":
            b = _torch_linspace_float32(lo, hi, n)
        else:
            b = np.linspace(lo, hi, n, dtype=np.float64)
        return b * b if self.beta_schedule == "scaled_linear" else b

    def alphas_cumprod(self, reference: str = "diffusers") -> np.ndarray:
        """float32 (T,) cumulative product of 1 - beta, bit-equal to the reference's tensor."""
        b = self.betas(reference)
        one_minus = (b.dtype.type(1) - b).astype(np.float64)  # 1 - b in the betas' precision
        # torch's CPU cumprod accumulates float32 in double; float64 numpy matches it exactly.
        return np.cumprod(one_minus).astype(np.float32)

    def sigmas(self, reference: str = "diffusers") -> np.ndarray:
        """float64 (T,) training sigmas, ascending in t."""
        return sigmas_from_alphas_cumprod(self.alphas_cumprod(reference))


@dataclasses.dataclass(frozen=True)
class EDMSchedule:
    """A model trained in EDM's continuous sigma parametrisation (Karras et al. 2022), as diffusers'
    EDMEulerScheduler config describes it. Defaults are diffusers' (the config's missing keys);
    `COSXL` below holds CosXL's. The sampler plan (samplers.make_plan "edm_euler") reads it:
    sigmas from sigma_max down to sigma_min ("karras": rho-spaced; "exponential": log-linear),
    then 0 ("zero") or sigma_min again; model input x / sqrt(sigma^2 + sigma_data^2); UNet
    timestep 0.25 log(sigma); denoised = c_skip x + c_out output (EDM's preconditioning)."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    sigma_schedule: str = "karras"
    rho: float = 7.0
    prediction_type: str = "epsilon"
    final_sigmas_type: str = "zero"

    def __post_init__(self):
        _check_prediction_type(self.prediction_type)
        if self.sigma_schedule not in EDM_SIGMA_SCHEDULES:
            raise ScheduleError(f"sigma_schedule {self.sigma_schedule!r} is not one of {EDM_SIGMA_SCHEDULES}")
        if self.final_sigmas_type not in ("zero", "sigma_min"):
            raise ScheduleError(f"final_sigmas_type {self.final_sigmas_type!r} is not 'zero' or 'sigma_min'")
        if not 0 < self.sigma_min < self.sigma_max or not self.sigma_data > 0 or not self.rho > 0:
            raise ScheduleError(f"need 0 < sigma_min < sigma_max, sigma_data > 0 and rho > 0; got sigma_min="
                                f"{self.sigma_min}, sigma_max={self.sigma_max}, sigma_data={self.sigma_data}, "
                                f"rho={self.rho}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, source: str = "scheduler config") -> "EDMSchedule":
        """Read an EDMEulerScheduler (or EDMDPMSolverMultistepScheduler) config dict."""
        _check_scheduler_class(config, source, edm=True)
        kwargs = {f.name: config[f.name] for f in dataclasses.fields(cls) if config.get(f.name) is not None}
        try:
            return cls(**kwargs)
        except (ScheduleError, TypeError) as e:
            raise ScheduleError(f"{source}: {e}") from None

    def sigmas(self, steps: int, schedule: str | None = None) -> np.ndarray:
        """float32 (steps,) sampling sigmas, descending, as diffusers' set_timesteps computes them
        (karras in float64 then float32; exponential a float32 torch.linspace of log-sigmas)."""
        schedule = schedule or self.sigma_schedule
        if schedule not in EDM_SIGMA_SCHEDULES:
            raise ScheduleError(f"edm_euler: schedule {schedule!r} is not one of {EDM_SIGMA_SCHEDULES}")
        if schedule == "karras":
            return karras_sigmas(steps, self.sigma_min, self.sigma_max, self.rho).astype(np.float32)
        logs = _torch_linspace_float32(np.log(self.sigma_min), np.log(self.sigma_max), steps)
        return np.exp(logs.astype(np.float64)).astype(np.float32)[::-1]


def noise_schedule_from_config(config: Mapping[str, Any], *,
                               source: str = "scheduler config") -> "TrainingSchedule | EDMSchedule":
    """The model's noise schedule from its diffusers scheduler config: an EDMSchedule for the EDM
    scheduler classes (CosXL), else the DDPM TrainingSchedule (every other SD scheduler)."""
    if config.get("_class_name") in EDM_SCHEDULERS:
        return EDMSchedule.from_config(config, source=source)
    return TrainingSchedule.from_config(config, source=source)


def _check_prediction_type(prediction_type) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ScheduleError(f"prediction_type {prediction_type!r} is not supported; choose one of {PREDICTION_TYPES}")


def _check_scheduler_class(config: Mapping[str, Any], source: str, *, edm: bool) -> None:
    name = config.get("_class_name")
    if name in UNSUPPORTED_SCHEDULERS:
        raise ScheduleError(f"{source}: scheduler {name} (another noise parametrisation) is not supported; "
                            f"supported are the DDPM (betas) schedulers and {', '.join(EDM_SCHEDULERS)}")
    if edm and name is not None and name not in EDM_SCHEDULERS:
        raise ScheduleError(f"{source}: {name} is not an EDM scheduler ({', '.join(EDM_SCHEDULERS)})")
    if not edm and name in EDM_SCHEDULERS:
        raise ScheduleError(f"{source}: {name} describes an EDM model, not DDPM betas "
                            "(read it with noise_schedule_from_config)")


COSXL = EDMSchedule(sigma_min=0.002, sigma_max=120.0, sigma_data=1.0, sigma_schedule="exponential",
                    prediction_type="v_prediction")   # CosXL (Edit)'s scheduler, as diffusers' docs set it


def _check_reference(reference: str) -> None:
    if reference not in REFERENCES:
        raise ScheduleError(f"reference {reference!r} is not one of {REFERENCES}")


def _torch_linspace_float32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n, dtype=float32) on CPU, bit for bit.

    torch rounds start/end/step to float32, fills the first half forward from start and the
    second half backward from end, with fused multiply-adds (exact product, one rounding);
    a float64 multiply-add of float32 values followed by one rounding reproduces that.
    """
    a, b = np.float32(start), np.float32(end)
    step = np.float64((b - a) / np.float32(n - 1)) if n > 1 else 0.0
    i = np.arange(n, dtype=np.float64)
    forward = np.float64(a) + step * i
    backward = np.float64(b) - step * (n - 1 - i)
    return np.where((i < n // 2) | (n == 1), forward, backward).astype(np.float32)   # n = 1: [start]


def sigmas_from_alphas_cumprod(alphas_cumprod: np.ndarray) -> np.ndarray:
    ac = np.asarray(alphas_cumprod, dtype=np.float64)
    return np.sqrt((1.0 - ac) / ac)


def sigma_to_t(sigma: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma: linear interpolation in log-sigma.

    The formula of k-diffusion's DiscreteSchedule.sigma_to_t (diffusers' `_sigma_to_t` is the
    same): find the bracketing training sigmas, interpolate the index, clamp to [0, T-1].
    """
    log_sigmas = np.log(np.asarray(train_sigmas, dtype=np.float64))
    log_sigma = np.log(np.maximum(np.asarray(sigma, dtype=np.float64), 1e-10))
    # Index of the last training log-sigma <= log_sigma (log_sigmas ascend), kept one below the end.
    low = np.clip(np.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, len(log_sigmas) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0.0, 1.0)
    return (1.0 - w) * low + w * (low + 1)


def t_to_sigma(t: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """Sigma at a fractional timestep: linear interpolation in log-sigma (k-diffusion)."""
    log_sigmas = np.log(np.asarray(train_sigmas, dtype=np.float64))
    t = np.asarray(t, dtype=np.float64)
    low, high = np.floor(t).astype(np.int64), np.ceil(t).astype(np.int64)
    w = t - low
    return np.exp((1.0 - w) * log_sigmas[low] + w * log_sigmas[high])


def kdiffusion_sigmas(steps: int, train_sigmas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The authors' schedule, k-diffusion CompVisDenoiser.get_sigmas(steps).

    t = linspace(T-1, 0, steps), sigma = exp(log-sigma interpolation at t), then a final 0.
    Returns (sigmas (steps+1,), UNet timesteps (steps,) = sigma_to_t(sigma)) in float64.
    """
    t = np.linspace(len(train_sigmas) - 1, 0, steps)
    sigmas = t_to_sigma(t, train_sigmas)
    return np.append(sigmas, 0.0), sigma_to_t(sigmas, train_sigmas)


def diffusers_euler_sigmas(steps: int, train_sigmas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """diffusers Euler / Euler-ancestral with timestep_spacing="linspace".

    Float timesteps linspace(0, T-1, steps) (float32, descending); sigma interpolated LINEARLY
    in sigma between the float32 training sigmas; final sigma 0.
    """
    n_train = len(train_sigmas)
    t = np.linspace(0, n_train - 1, steps, dtype=np.float32)[::-1]
    train32 = np.asarray(train_sigmas, dtype=np.float32)
    sigmas = np.interp(t, np.arange(n_train), train32).astype(np.float32)
    return np.append(sigmas.astype(np.float64), 0.0), t.astype(np.float64)


def diffusers_dpm_timesteps(steps: int, num_train_timesteps: int) -> np.ndarray:
    """diffusers DPMSolverMultistep, timestep_spacing="linspace": integer timesteps, descending."""
    t = np.linspace(0, num_train_timesteps - 1, steps + 1).round()[::-1][:-1]
    return t.astype(np.int64)


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) schedule: uniform in sigma^(1/rho) from sigma_max down to sigma_min."""
    ramp = np.linspace(0.0, 1.0, steps)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def ddim_timesteps(steps: int, num_train_timesteps: int, steps_offset: int) -> tuple[np.ndarray, int]:
    """diffusers DDIM, timestep_spacing="leading": (integer timesteps descending, step ratio)."""
    ratio = num_train_timesteps // steps
    t = (np.arange(steps) * ratio).round()[::-1].astype(np.int64) + steps_offset
    if t[0] >= num_train_timesteps or t[-1] < 0:
        raise ScheduleError(f"ddim: {steps} steps with steps_offset={steps_offset} reach timestep {t[0]}, "
                            f"outside the {num_train_timesteps} training timesteps")
    return t, ratio


def add_noise(alphas_cumprod, x0, noise, t):
    """Forward process q(x_t | x0) = sqrt(ac[t]) x0 + sqrt(1 - ac[t]) noise, per example (jit-able).

    t: (B,) integer timesteps; x0, noise: (B, ...).
    """
    ac = jnp.asarray(alphas_cumprod, jnp.float32)[t].reshape((-1,) + (1,) * (x0.ndim - 1))
    return (jnp.sqrt(ac) * x0 + jnp.sqrt(1.0 - ac) * noise).astype(x0.dtype)
