"""Sampling every prompt's candidate pairs, CLIP-filtering them and writing the authors' layout.

Work is streamed in fixed-size batches of pairs across prompt boundaries (one compiled
function serves the whole run); batch k+1 is started before batch k is scored and written,
so the host work overlaps the device work. Once all its candidates are sampled, a prompt's
pairs are CLIP-scored together (one fixed batching per prompt, whichever calls its candidates
came in) and its dir is written, atomically (ip2p_jax.datagen.layout): a rerun skips finished
prompts and a kill loses nothing finished. Everything random is a function of (--seed, prompt
index), so a resumed, partitioned or multi-host run writes what one uninterrupted run would.

Multi-host: prompt k of the run belongs to process k % P; each process fills its rows of every
sharded call with its own prompts' candidates (padding once it runs out; the processes agree on
the number of calls first), and text encoding, CLIP scoring and writing stay on the process.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image

from ip2p_jax import files, sharding
from ip2p_jax.datagen import layout
from ip2p_jax.datagen.image_pairs.clip_filter import ClipFilter, pair_scores, select
from ip2p_jax.datagen.image_pairs.sampler import PairRequestError, PairSampler, injected_steps
from ip2p_jax.progress import progress as progress_bar

SEED_SPACE = 2 ** 32           # the authors draw seeds with torch.randint(1 << 32)
RUN_FILE = "generation.json"   # settings of the run that writes <out>, checked on resume
PAIRS_PER_DEVICE = 4           # default pairs per compiled call (16 UNet rows)
_SEED_STREAM = 0x9A1F          # separates the candidate-seed stream from other uses of the base seed


@dataclasses.dataclass(frozen=True)
class PairSettings:
    """Defaults are the authors' generate_img_dataset.py (their README suggests steps=25 for speed)."""

    steps: int = 100
    samples_per_prompt: int = 100        # candidates sampled per prompt before the filter
    keep: int = 4                        # at most this many pairs kept per prompt
    resolution: int = 512
    p2p_range: tuple = (0.1, 0.9)        # threshold ~ U[lo, hi): fraction of steps with injection
    cfg_range: tuple = (7.5, 15.0)       # classifier-free guidance scale ~ U[lo, hi)
    clip_filter: ClipFilter = ClipFilter()
    seed: int = 0                        # base seed of the candidate seeds
    sampler: str = "euler_a"
    schedule: str | None = None          # None: the sampler's default ("kdiffusion" for euler_a, the authors')
    jpeg_quality: int = 100

    def check(self) -> None:
        def positive_int(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise PairRequestError(f"{name} must be a positive integer, got {v!r}")

        for name in ("steps", "samples_per_prompt", "keep", "resolution"):
            positive_int(name)
        for name in ("p2p_range", "cfg_range"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise PairRequestError(f"{name}: minimum {lo} is above maximum {hi}")
        if not (0 <= self.p2p_range[0] and self.p2p_range[1] <= 1):
            raise PairRequestError(f"p2p_range must lie in [0, 1], got {self.p2p_range}")
        if isinstance(self.seed, bool) or int(self.seed) != self.seed or self.seed < 0:
            raise PairRequestError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise PairRequestError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


@dataclasses.dataclass
class GenerateStats:
    written: int = 0      # prompt dirs this run finished
    skipped: int = 0      # prompt dirs finished before this run
    sampled: int = 0      # candidate pairs this run sampled
    kept: int = 0         # pairs this run wrote
    total_pairs: int = 0  # pairs listed in seeds.json (every finished dir, every run)


def partition_indices(num_prompts: int, partition: int = 0, num_partitions: int = 1, start: int = 0,
                      end: int | None = None) -> range:
    """Prompt indices of one partition: [start, end) split into `num_partitions` contiguous parts
    with numpy.array_split's sizes (the authors' partitioning)."""
    end = num_prompts if end is None else min(end, num_prompts)
    if not 0 <= start <= end:
        raise PairRequestError(f"prompt range start {start} / end {end} is not within 0..{num_prompts}")
    if not 0 <= partition < num_partitions:
        raise PairRequestError(f"partition {partition} is not in 0..{num_partitions - 1}")
    q, r = divmod(end - start, num_partitions)
    lo = start + partition * q + min(partition, r)
    return range(lo, lo + q + (partition < r))


def candidate_seeds(base_seed: int, prompt_index: int, n: int) -> list[int]:
    """`n` distinct seeds in [0, 2**32) for a prompt, a function of (base_seed, prompt_index)."""
    rng = np.random.default_rng([int(base_seed), int(prompt_index), _SEED_STREAM])
    return [int(s) for s in rng.choice(SEED_SPACE, size=n, replace=False)]


def draw_sample(seed: int, latent_shape: tuple, settings: PairSettings) -> tuple[float, float, np.ndarray]:
    """(p2p threshold, cfg scale, start noise) of one candidate, from its seed alone (numpy PCG64:
    uniform threshold, uniform scale, then standard normal noise)."""
    rng = np.random.default_rng(seed)
    (p_lo, p_hi), (c_lo, c_hi) = settings.p2p_range, settings.cfg_range
    p2p = p_lo + rng.random() * (p_hi - p_lo)
    cfg = c_lo + rng.random() * (c_hi - c_lo)
    return float(p2p), float(cfg), rng.standard_normal(latent_shape, dtype=np.float32)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8 by truncation, as the authors' to_pil (255 * x, astype(uint8))."""
    return (255.0 * np.clip(images, 0.0, 1.0)).astype(np.uint8)


def check_prompts(prompts: Sequence) -> None:
    for i, p in enumerate(prompts):
        if not isinstance(p, dict) or any(not isinstance(p.get(k), str) for k in layout.PROMPT_KEYS):
            raise layout.LayoutError(f"prompt {i}: needs text keys {layout.PROMPT_KEYS}, got {p!r:.200}")


def _check_run_file(out: Path, record: dict) -> bool:
    """Check that an earlier run of <out> used the same settings; True if it has no generation.json yet."""
    path = out / RUN_FILE
    if not path.exists():
        return True
    have, now = json.loads(path.read_text()).get("settings", {}), record["settings"]
    diffs = [f"{k}: {have.get(k)!r} there, {now.get(k)!r} now" for k in sorted(set(have) | set(now))
             if have.get(k) != now.get(k)]
    if diffs:
        raise layout.LayoutError(f"{out} was generated with other settings ({'; '.join(diffs)}); resume with "
                                 "the same settings or use a fresh output folder")
    return False


# ---------------------------------------------------------------- agreeing between processes

def _gather(values: np.ndarray) -> np.ndarray:
    """(processes, *values.shape): every process's `values` (collective; no-op with one process)."""
    if jax.process_count() == 1:
        return values[None]
    return np.asarray(multihost_utils.process_allgather(values)).reshape((-1,) + values.shape)


def _together(step):
    """Run `step()` on every process; if it raises on any, raise on all (no process is left
    waiting in a collective for one that stopped)."""
    error = None
    try:
        result = step()
    except (ValueError, OSError) as e:   # Ip2pError is a ValueError
        error = e
    failed = _gather(np.array([error is not None], np.int32))[:, 0]
    if error is not None:
        raise error
    if failed.any():
        raise layout.LayoutError(f"process {int(np.argmax(failed))} stopped the run (see its message)")
    return result


def _gather_seeds(entries: list) -> list:
    """[[dir_name, seeds]] of every process from each one's own (small metadata, no images)."""
    if jax.process_count() == 1:
        return entries
    flat = np.array([x for name, seeds in entries for x in (int(name), len(seeds), *seeds)], np.int64)
    size = int(_gather(np.array([len(flat)], np.int64)).max())
    rows = _gather(np.pad(flat, (0, size - len(flat)), constant_values=-1))
    merged = []
    for row in rows:
        k = 0
        while k < len(row) and row[k] >= 0:
            n = int(row[k + 1])
            merged.append([layout.dir_name(int(row[k])), [int(x) for x in row[k + 2:k + 2 + n]]])
            k += 2 + n
    return merged


@dataclasses.dataclass(eq=False)
class _PromptWork:
    index: int
    prompt: dict
    cond: np.ndarray                    # (2, 77, D) [input, edited] caption embeddings
    text_features: np.ndarray | None    # (2, D) CLIP text features, None without a filter
    pending: int                        # candidates not yet sampled
    results: dict = dataclasses.field(default_factory=dict)   # seed -> metadata line
    images: dict = dataclasses.field(default_factory=dict)    # seed -> (uint8 img0, img1)


def generate_pairs(sampler: PairSampler, prompts: Sequence[dict], out, settings: PairSettings = PairSettings(), *,
                   scorer=None, indices: Iterable[int] | None = None, batch_size: int | None = None,
                   progress: bool = True, run_info: dict | None = None) -> GenerateStats:
    """Generate the pairs of prompts[i] for i in `indices` (default all) into `out`.

    scorer: a ip2p_jax.metrics.clip_scores.ClipScorer (ViT-L/14 in real use); None = no CLIP
      filter: only `keep` candidates per prompt are sampled and all are written.
    batch_size: pairs per compiled call over all devices (default 4 per device; rounded up to
      the device count).
    run_info: extra facts recorded in <out>/generation.json (e.g. model paths).

    Multi-host (after jax.distributed.initialize): collective, every process calls it with the
    same arguments. The k-th prompt of `indices` belongs to process k % P, which encodes its
    captions, samples its pairs as its rows of each sharded call, CLIP-scores them and writes
    its dir; process 0 writes generation.json (first) and seeds.json (last, from every process's
    kept seeds). The returned stats are this process's (total_pairs: the whole seeds.json).
    """
    p, count = jax.process_index(), jax.process_count()
    settings.check()
    check_prompts(prompts)
    indices = list(range(len(prompts)) if indices is None else indices)
    if any(not 0 <= i < len(prompts) for i in indices):
        raise PairRequestError(f"prompt indices must lie in 0..{len(prompts) - 1}")
    mine = indices[p::count]
    plan = sampler.plan(settings.steps, settings.sampler, settings.schedule)
    shape = sampler.latent_shape(settings.resolution)
    out = Path(out)
    record = {"settings": dict(settings.to_dict(), clip_filter_applied=scorer is not None, dtype=sampler.dtype.name),
              **(run_info or {})}

    def prepare():   # every process checks the settings and its own prompts' dirs
        out.mkdir(parents=True, exist_ok=True)
        fresh = _check_run_file(out, record)
        layout.remove_stale_partial_dirs(out, None if count == 1 else mine)
        return fresh, [i for i in mine if not layout.is_finished(out, i, prompts[i])]

    fresh, todo = _together(prepare)
    if fresh and p == 0:
        files.write_text(out / RUN_FILE, json.dumps(record, indent=1))
    stats = GenerateStats(skipped=len(mine) - len(todo))
    n_candidates = settings.samples_per_prompt if scorer is not None else min(settings.samples_per_prompt,
                                                                               settings.keep)
    total = len(todo) * n_candidates
    size = batch_size or PAIRS_PER_DEVICE * sampler.num_devices
    size = sharding.padded_size(min(size, sharding.bucket_size(int(_gather(np.array([total]))[:, 0].sum()))),
                                sampler.num_devices)
    local = size * sampler.num_local_devices // sampler.num_devices    # this process's rows of a call
    calls = int(_gather(np.array([-(-total // local)]))[:, 0].max())    # the same on every process
    null = sampler.encode_text([""])[0]

    def jobs() -> Iterator[tuple[_PromptWork, int]]:
        for i in todo:
            prompt = prompts[i]
            captions = [prompt["input"], prompt["output"]]
            work = _PromptWork(i, prompt, sampler.encode_text(captions),
                               scorer.text_features(captions) if scorer is not None else None, n_candidates)
            for seed in candidate_seeds(settings.seed, i, n_candidates):
                yield work, seed

    def dispatch(chunk):   # a process out of work fills its rows of the call with padding
        draws = [draw_sample(seed, shape, settings) for _, seed in chunk]
        if chunk:
            pad = lambda rows: sharding.pad_rows(np.asarray(rows), local)  # noqa: E731
            rows = ([d[2] for d in draws], [seed for _, seed in chunk], [w.cond for w, _ in chunk],
                    [d[1] for d in draws], [injected_steps(d[0], settings.steps) for d in draws])
        else:
            pad = lambda rows: np.repeat(np.asarray(rows), local, axis=0)  # noqa: E731
            rows = ([np.zeros(shape, np.float32)], [0], [np.stack([null, null])], [1.0], [0])
        noise, seeds, cond, cfg, inject = (pad(r) for r in rows)
        result = sampler.generate(plan, noise=noise, seeds=seeds, cond=cond, null=null, cfg_scale=cfg,
                                  inject_steps=inject)
        return result, chunk, draws

    def collect(result, chunk, draws):
        images = to_uint8(sharding.to_local(result, sampler.mesh)[:len(chunk)])
        for r, ((work, seed), (p2p, cfg, _)) in enumerate(zip(chunk, draws)):
            work.results[seed] = {"seed": seed, "p2p_threshold": p2p, "cfg_scale": cfg}
            work.images[seed] = (images[r, 0].copy(), images[r, 1].copy())
            work.pending -= 1
            stats.sampled += 1
            if work.pending == 0:
                stats.kept += _finish_prompt(out, work, settings, scorer)
                stats.written += 1
        bar.update(len(chunk))
        bar.set_postfix_str(f"prompts={stats.written}/{len(todo)}, kept={stats.kept}")

    bar = progress_bar(total=total, desc="pairs" if count == 1 else f"pairs (process {p})", unit="pair",
                       enabled=progress)
    try:
        stream = jobs()
        pending = None   # start call k+1 on the devices before scoring and writing call k
        for k in range(calls + 1):
            started = dispatch(list(itertools.islice(stream, local))) if k < calls else None
            if pending is not None:
                collect(*pending)
            pending = started
    finally:
        bar.close()
        if count == 1:
            layout.remove_empty_partial_root(out)
    # seeds.json: process 0, once every process has finished its dirs (the gather is the barrier)
    kept = _gather_seeds([[layout.dir_name(i), layout.dir_seeds(out / layout.dir_name(i))] for i in mine
                          if (out / layout.dir_name(i)).is_dir()])
    if p == 0:
        stats.total_pairs = sum(len(seeds) for _, seeds in layout.finish(out, kept))
    else:
        stats.total_pairs = sum(len(seeds) for _, seeds in kept)
    return stats


def _finish_prompt(out: Path, work: _PromptWork, settings: PairSettings, scorer) -> int:
    """CLIP-score a prompt's sampled pairs (all at once), choose and write them; returns how many."""
    if scorer is not None:
        seeds = list(work.results)
        scores = pair_scores(scorer, [work.images[s][0] for s in seeds], [work.images[s][1] for s in seeds],
                             work.text_features)
        for seed, clip_metadata in zip(seeds, scores):
            work.results[seed].update(clip_metadata)
    return _write_prompt(out, work, settings, filtered=scorer is not None)


def _write_prompt(out: Path, work: _PromptWork, settings: PairSettings, *, filtered: bool) -> int:
    """Write one finished prompt dir with its selected pairs; returns how many."""
    chosen = select(work.results, settings.clip_filter if filtered else None, settings.keep)
    with layout.staged_prompt_dir(out, work.index, work.prompt) as tmp:
        for seed in chosen:
            for k, image in enumerate(work.images[seed]):
                Image.fromarray(image).save(tmp / f"{seed}_{k}.jpg", quality=settings.jpeg_quality)
        (tmp / "metadata.jsonl").write_text("".join(json.dumps(work.results[s]) + "\n" for s in chosen))
    work.images.clear()
    return len(chosen)
