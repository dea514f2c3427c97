"""The image stage of InstructPix2Pix's data generation ("pair stage"), in JAX.

    sampler = PairSampler.from_pretrained("path/to/stable-diffusion-v1-5")
    scorer = ClipScorer.from_pretrained("path/to/clip-vit-large-patch14")      # optional
    generate_pairs(sampler, read_prompts("prompts.jsonl"), "out/", PairSettings(steps=25), scorer=scorer)

For each prompt line {input, edit, output}, `samples_per_prompt` candidate pairs are sampled
with Stable Diffusion: image 0 from the input caption, image 1 from the edited caption, the same
start and ancestral noise, Prompt-to-Prompt on self-attention for the first fraction
p ~ U[0.1, 0.9] of the steps (image 1's maps replaced by image 0's), CFG scale ~ U[7.5, 15],
the authors' k-diffusion Euler ancestral sampler. The CLIP filter keeps at most `keep` pairs,
by directional similarity. Output: the authors' layout (ip2p_jax.datagen.layout) plus
<out>/generation.json (the run's settings, checked when a run resumes).

sampler.py      the jitted pair sampler (4 UNet rows per pair, p2p injection by row index, each
                device sampling its own pairs; the loop is ip2p_jax.diffusion.samplers.sample, the
                model placed by ip2p_jax.placement)
clip_filter.py  the filter thresholds and the choice of survivors
generate.py     seeds and random draws, batching across prompts, sharing prompts among the
                processes of a multi-host job, writing prompt dirs

Matches the authors' dataset_creation/generate_img_dataset.py in: defaults (100 steps, 100
samples, keep 4, 512 px, p2p U[0.1, 0.9], CFG U[7.5, 15], thresholds 0.2 / 0.2 / 0.7 compared
with `>=`), the row mapping (uncond img1 <- uncond img0, cond img1 <- cond img0), injection at
step i iff p > i / (steps - 1), sigmas (CompVisDenoiser, log-sigma interpolation), shared noise,
survivors sorted by (sim_dir, seed) descending, JPEG quality 100, 8-bit conversion by truncation,
metadata keys (seed, p2p_threshold, cfg_scale, clip_sim_0, clip_sim_1, clip_sim_dir,
clip_sim_image), contiguous partitions (numpy.array_split sizes).

Deviations, and why:
- Random numbers: the authors seed a global torch RNG at random and draw each candidate's seed
  from it; per seed, torch.manual_seed gives start noise, p, CFG scale and ancestral noise. Here
  candidate seeds (distinct, in [0, 2**32)) come from numpy PCG64 seeded by (--seed, prompt
  index), and per seed p, CFG scale and start noise from PCG64(seed), ancestral noise at step i
  from threefry fold_in(key(seed), i): every output is reproducible, and resumed or partitioned
  runs write what one run would. The same seed number gives other pictures than theirs.
- CLIP: the authors score the float images resized to 224 by torch bicubic (no antialiasing)
  with OpenAI's clip package. Here the saved 8-bit images go through transformers'
  CLIPImageProcessor (PIL bicubic, shortest side then centre crop: the same geometry for square
  images) and the project's Flax CLIP (ip2p_jax.metrics.clip_scores); scores differ slightly.
- Prompt dirs are written atomically once all candidates are scored (theirs are created first
  and appended to). A prompt with no survivor still gets a finished dir (prompt.json, empty
  metadata.jsonl) so reruns skip it; seeds.json (their separate prepare_dataset.py step) is
  written at the end of each run and lists only dirs with seeds, as int seeds.
- Batching: P pairs per UNet call (4P rows) instead of one; rows of different pairs never mix,
  so results do not depend on the batch. CFG is applied to eps instead of the denoised latents
  (the same numbers up to rounding: denoised = x - sigma * eps is affine in eps).
- Precision: bf16 on GPU/TPU, fp32 on CPU (theirs: fp16 autocast on CUDA).
- With steps = 1 (their formula divides by zero) the single step is injected iff p > 0.
- Without a CLIP model (not an option of theirs) nothing is filtered: `keep` candidates are
  sampled and all are written, without clip_* metadata keys.
- A prompt's index counts non-blank lines of the prompts file (theirs parses every line).
"""

from ip2p_jax.datagen.image_pairs.clip_filter import METADATA_KEYS, ClipFilter, pair_scores, select
from ip2p_jax.datagen.image_pairs.generate import (GenerateStats, PairSettings, candidate_seeds, check_prompts,
                                                   draw_sample, generate_pairs, partition_indices, to_uint8)
from ip2p_jax.datagen.image_pairs.sampler import (PairModelError, PairRequestError, PairSampler, injected_steps,
                                                  self_attn_source)
from ip2p_jax.datagen.layout import LayoutError, read_prompts

__all__ = [
    "METADATA_KEYS", "ClipFilter", "GenerateStats", "LayoutError", "PairModelError", "PairRequestError",
    "PairSampler", "PairSettings",
    "candidate_seeds", "check_prompts", "draw_sample", "generate_pairs", "injected_steps", "pair_scores",
    "partition_indices", "read_prompts", "select", "self_attn_source", "to_uint8",
]
