"""Noise schedules, samplers and dual classifier-free guidance; pure, jit-able, model-free."""
from ip2p_jax.diffusion.guidance import (combine, expand, expand_latents, expand_text, guided_eps_fn,
                                         split_branches)
from ip2p_jax.diffusion.samplers import (ANY, DDPM_SAMPLERS, DEFAULT_SCHEDULE, EDM_SAMPLERS, EDM_SCHEDULES, SAMPLERS,
                                         SIGMA_SCHEDULES, EpsFn, Plan, SamplerState, check_names, default_sampler,
                                         default_schedule, generic_plan, init_state, is_ancestral, make_plan,
                                         model_input, sample, step, step_noise)
from ip2p_jax.diffusion.schedules import (COSXL, PREDICTION_TYPES, EDMSchedule, ScheduleError, TrainingSchedule,
                                          add_noise, noise_schedule_from_config)

__all__ = [
    "DEFAULT_SCHEDULE", "SAMPLERS", "SIGMA_SCHEDULES", "EpsFn", "Plan", "SamplerState", "ScheduleError",
    "TrainingSchedule", "add_noise", "combine", "expand", "expand_latents", "expand_text",
    "ANY", "generic_plan", "guided_eps_fn", "init_state", "is_ancestral", "make_plan", "model_input", "sample",
    "split_branches", "step", "step_noise",
    "COSXL", "DDPM_SAMPLERS", "EDM_SAMPLERS", "EDM_SCHEDULES", "EDMSchedule", "PREDICTION_TYPES", "check_names",
    "default_sampler", "default_schedule", "noise_schedule_from_config",
]
