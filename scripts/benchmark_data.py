#!/usr/bin/env python
"""Measure the TFDS build rate and the input pipeline's examples/s on this machine.

  python scripts/benchmark_data.py                       # 512² JPEG sources -> 256² crops
  python scripts/benchmark_data.py --pairs 2000 --source-size 512 --quality 95 --workers 0 2

Makes a synthetic source in the authors' layout (noisy gradient images, so JPEG decoding is
no cheaper than for photos), builds it, then times:
  * per-example CPU time of the pipeline's work (read record, decode, resize/crop/flip,
    to float, tokenise) in one thread -> examples/s per core;
  * the whole pipeline (batches, threads, worker processes) in wall-clock examples/s.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def make_source(root: str, pairs: int, size: int, quality: int, seeds_per_prompt: int = 4):
    import io
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([yy, xx, 1 - yy], -1)
    index = []
    for p in range((pairs + seeds_per_prompt - 1) // seeds_per_prompt):
        name = f"{p:07d}"
        os.makedirs(os.path.join(root, name))
        with open(os.path.join(root, name, "prompt.json"), "w") as f:
            json.dump({"input": f"a photo of a dog number {p}", "edit": f"make it winter, version {p}",
                       "output": f"a photo of a dog number {p} in winter"}, f)
        seeds = list(range(seeds_per_prompt))
        for s in seeds:
            for k in (0, 1):
                img = np.clip(255 * (0.85 * base + 0.15 * rng.random((size, size, 3))), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, "JPEG", quality=quality)
                with open(os.path.join(root, name, f"{s}_{k}.jpg"), "wb") as f:
                    f.write(buf.getvalue())
        index.append([name, seeds])
    with open(os.path.join(root, "seeds.json"), "w") as f:
        json.dump(index, f)


def per_example_cpu(pipe, n: int, draft: bool) -> dict:
    """CPU seconds per example for each stage of the pipeline's work, one thread."""
    import numpy as np

    from ip2p_jax.data import augment as aug
    from ip2p_jax.data.builder import IMAGE_FEATURES
    from ip2p_jax.tokenizer import fast_tokenizer, tokenize

    cfg, src, tok = pipe.config.augment, pipe.source, fast_tokenizer(pipe.tokenizer)
    stages = dict.fromkeys(["read record", "decode", "resize+crop+flip", "to float", "tokenise"], 0.0)
    for i in range(n):
        rng = np.random.default_rng([0, i])
        t0 = time.process_time()
        ex = src[i % len(src)]
        t1 = time.process_time()
        p = aug.draw_params(cfg, rng)
        ims = [aug.decode_rgb(ex[k], p.size if draft else None) for k in IMAGE_FEATURES]
        for im in ims:
            im.load()
        t2 = time.process_time()
        x0, x1 = (aug.apply_params(im, p, cfg.crop_size) for im in ims)
        t3 = time.process_time()
        aug.to_float(x0), aug.to_float(x1)
        t4 = time.process_time()
        tokenize(tok, [ex["instruction"].decode()])
        t5 = time.process_time()
        for k, dt in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            stages[k] += dt / n
    return stages


def main(argv=None) -> int:
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain worker processes read absl flags
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=1000)
    p.add_argument("--source-size", type=int, default=512)
    p.add_argument("--quality", type=int, default=95)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--workers", type=int, nargs="*", default=[0, 2])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--draft-decode", action="store_true", help="pipeline runs with AugmentConfig(draft_decode=True)")
    p.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    args = p.parse_args(argv)

    import tiny
    from ip2p_jax.data.augment import AugmentConfig
    from ip2p_jax.data.builder import build_dataset, open_dataset
    from ip2p_jax.data.pipeline import EditPairPipeline, PipelineConfig

    work = args.dir or tempfile.mkdtemp(prefix="bench_data_")
    print(f"cores: {os.cpu_count()}  work dir: {work}")
    t = time.perf_counter()
    if os.path.exists(os.path.join(work, "src", "seeds.json")):
        print(f"source: reusing {os.path.join(work, 'src')}")
    else:
        make_source(os.path.join(work, "src"), args.pairs, args.source_size, args.quality)
        print(f"source: {args.pairs} pairs of {args.source_size}² JPEG q{args.quality} "
              f"({time.perf_counter() - t:.1f} s to make)")

    report = build_dataset("authors", os.path.join(work, "src"), os.path.join(work, "data"), "bench",
                           overwrite=True, progress=False)
    print(f"TFDS build: {report.total} examples in {report.seconds:.1f} s = {report.total / report.seconds:.0f} "
          f"examples/s ({sum(report.num_bytes.values()) / report.total / 1e3:.0f} kB/example)")

    builder = open_dataset(report.path)
    tok = tiny.tokenizer(os.path.join(work, "tok"))
    res = args.resolution
    aug_cfg = AugmentConfig(res, res, res, draft_decode=args.draft_decode)

    pipe = EditPairPipeline(builder, tok, PipelineConfig(global_batch_size=args.batch, augment=aug_cfg),
                            process_index=0, process_count=1)
    for draft in (False, True):
        stages = per_example_cpu(pipe, 200, draft)
        cpu = sum(stages.values())
        mode = "draft_decode (reduced-scale JPEG decoding)" if draft else "exact (authors': full decode + LANCZOS)"
        print(f"per-example CPU time, {args.source_size}² -> {res}², {mode}: {cpu * 1e3:.1f} ms "
              f"= {1 / cpu:.0f} examples/s per core")
        for k, v in stages.items():
            print(f"  {k:<18} {v * 1e3:6.2f} ms")
        print(f"  => 16-core host, 14 cores feeding (2 left for the training loop): {14 / cpu:.0f} examples/s")

    for workers in args.workers:
        cfg = PipelineConfig(global_batch_size=args.batch, augment=aug_cfg, worker_count=workers,
                             read_threads=args.threads, prefetch_batches=2)
        with EditPairPipeline(builder, tok, cfg, process_index=0, process_count=1) as pipe:
            for _ in range(2):  # start-up, warm-up
                next(pipe)
            t, c = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                next(pipe)
            dt = time.perf_counter() - t
        n = args.steps * args.batch
        cpu = time.process_time() - c
        print(f"pipeline, {workers} worker processes x {args.threads} threads, batch {args.batch}: "
              f"{n / dt:.0f} examples/s wall-clock; this process's CPU {cpu / n * 1e3:.1f} ms/example"
              + (" (all the work: compare with the per-example sum above)" if workers == 0 else
                 " (the workers' CPU not counted)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
