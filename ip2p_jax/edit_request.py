"""What an edit request may ask for: the default and random guidance scales, the limits every
request is checked against (the API, `ip2p edit`, dataset jobs and the web UI alike), and the
seeds of its outputs. Cheap, and free of models: callers check a request before loading one.
"""
from __future__ import annotations

import secrets

import numpy as np

from ip2p_jax.errors import Ip2pError

TEXT_SCALE = 7.5                   # default text guidance: the authors' (SD), and diffusers' SD pipeline
SDXL_TEXT_SCALE = 5.0              # diffusers' StableDiffusionXLInstructPix2PixPipeline default
RANDOM_TEXT_SCALE = (6.0, 9.0)     # the authors' app, "randomize CFG"
RANDOM_IMAGE_SCALE = (1.2, 1.8)
SEED_LIMIT = 2 ** 32
# Request limits, applied alike to the API, `ip2p edit` and the web UI (one request can neither
# exhaust the host nor write garbage). Pixel budgets: ip2p_jax.images (max_pixels, max_edit_pixels).
MAX_STEPS = 1000                   # the training timesteps: more sampler steps than that mean nothing
MAX_NUM_SAMPLES = 256              # outputs per image in one request
MAX_BATCH_SIZE = 4096              # edits per compiled call
MAX_SCALE = 100.0                  # |text_scale|, |image_scale|; NaN and inf are refused


class EditError(Ip2pError):
    """A model that cannot edit, or an edit request that cannot be run; the message says why."""


def output_seeds(seed, n: int, num_samples: int) -> list[list[int]]:
    """seeds[j][k] for sample k of image j: None -> a random base; an int s -> s + output index;
    one int per image s_j -> s_j + k."""
    if seed is None or np.ndim(seed) == 0:
        base = secrets.randbelow(2 ** 31) if seed is None else int(seed)
        seeds = [[base + j * num_samples + k for k in range(num_samples)] for j in range(n)]
    else:
        per = [int(s) for s in seed]
        if len(per) != n:
            raise EditError(f"{len(per)} seeds for {n} images (give one int, or one per image)")
        seeds = [[s + k for k in range(num_samples)] for s in per]
    flat = [s for row in seeds for s in row]
    if min(flat) < 0 or max(flat) >= SEED_LIMIT:
        raise EditError(f"seeds must lie in [0, 2**32); got {min(flat)}..{max(flat)}")
    return seeds


def random_scales(seed: int, n: int) -> tuple[list[float], list[float]]:
    """`randomize_scales`: n text scales in U[6, 9] and n image scales in U[1.2, 1.8] from `seed`
    (the first output's seed of the request)."""
    rng = np.random.default_rng(seed)
    return ([round(float(v), 3) for v in rng.uniform(*RANDOM_TEXT_SCALE, n)],
            [round(float(v), 3) for v in rng.uniform(*RANDOM_IMAGE_SCALE, n)])


def check_request(*, steps, num_samples: int = 1, batch_size: int | None = None, text_scale=TEXT_SCALE,
                  image_scale=1.5, guidance_rescale=0.0) -> None:
    """EditError (naming the setting and its flag) unless every setting is within the request
    limits above (a scale of None, or None in a list of them: the model's default, not checked).
    Cheap: callers run it before any planning, loading or compiling."""
    def count(value, name, limit):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= limit:
            raise EditError(f"{name} / --{name.replace('_', '-')} must be an integer from 1 to {limit}, "
                            f"got {value!r}")

    count(steps, "steps", MAX_STEPS)
    count(num_samples, "num_samples", MAX_NUM_SAMPLES)
    if batch_size is not None:
        count(batch_size, "batch_size", MAX_BATCH_SIZE)
    for name, value in (("text_scale", text_scale), ("image_scale", image_scale)):
        try:
            scales = np.asarray([v for v in np.ravel(np.asarray(value, dtype=object)) if v is not None],
                                dtype=np.float64)
        except (TypeError, ValueError):
            scales = np.array(np.nan)
        if not np.all(np.isfinite(scales)) or np.any(np.abs(scales) > MAX_SCALE):
            raise EditError(f"{name} / --{name.replace('_', '-')} must be finite numbers with "
                            f"|value| <= {MAX_SCALE:g}, got {value!r}")
    if isinstance(guidance_rescale, bool) or not isinstance(guidance_rescale, (int, float, np.floating)) \
            or not 0.0 <= guidance_rescale <= 1.0:
        raise EditError(f"guidance_rescale / --guidance-rescale must be a number from 0 to 1, got {guidance_rescale!r}")


def per_item(value, n: int, name: str, default: float | None = None) -> list[float]:
    """A scale given once or per image -> one float per image (EditError on a count mismatch);
    None, alone or in the list, is `default` (the model's, for text_scale)."""
    if np.ndim(value) == 0:
        value = [value] * n
    vals = [float(default if v is None else v) for v in value]
    if len(vals) != n:
        raise EditError(f"{name}: {len(vals)} values for {n} images (give one number, or one per image)")
    return vals
