"""Noise schedules, samplers and dual classifier-free guidance; pure, jit-able, model-free."""
from ip2p_jax.diffusion.guidance import (combine, expand, expand_latents, expand_text, guided_eps_fn,
                                         split_branches)
from ip2p_jax.diffusion.samplers import (ANY, DEFAULT_SCHEDULE, SAMPLERS, SIGMA_SCHEDULES, EpsFn, Plan, SamplerState,
                                         generic_plan, init_state, is_ancestral, make_plan, model_input, sample, step,
                                         step_noise)
from ip2p_jax.diffusion.schedules import ScheduleError, TrainingSchedule, add_noise

__all__ = [
    "DEFAULT_SCHEDULE", "SAMPLERS", "SIGMA_SCHEDULES", "EpsFn", "Plan", "SamplerState", "ScheduleError",
    "TrainingSchedule", "add_noise", "combine", "expand", "expand_latents", "expand_text",
    "ANY", "generic_plan", "guided_eps_fn", "init_state", "is_ancestral", "make_plan", "model_input", "sample",
    "split_branches", "step", "step_noise",
]
