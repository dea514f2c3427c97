#!/usr/bin/env python
"""Build an edit-pair TFDS dataset (array_record, no TensorFlow needed) from one of four formats.

  python scripts/build_tfds.py --format authors --source data/clip-filtered --data-dir ~/tfds --name clip_filtered
  python scripts/build_tfds.py --format parquet --source hf_parquet/ --data-dir ~/tfds --name hf
  python scripts/build_tfds.py --format jsonl   --source my_pairs.jsonl --data-dir ~/tfds --name mine
  python scripts/build_tfds.py --format magicbrush --source MagicBrush/data --data-dir ~/tfds --name magicbrush

Large sources: --beam builds the same dataset through an Apache Beam pipeline (pip install
'ip2p_jax[beam]'), e.g. --beam --beam_pipeline_options "runner=DirectRunner,direct_num_workers=4,
direct_running_mode=multi_processing", or a Dataflow / Spark / Flink runner (docs/data.md).

Writes <data-dir>/edit_pairs/<name>/1.0.0/ (see docs/data.md). Bad items are skipped and listed
in the summary; --strict stops at the first one instead. Read it back with
`ip2p_jax.data.open_dataset(data_dir, name)`.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ip2p_jax.errors import Ip2pError  # noqa: E402  (after the path set-up above)


def main(argv=None) -> int:
    from ip2p_jax.data.builder import build_dataset
    from ip2p_jax.data.sources import FORMATS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--format", required=True, choices=sorted(FORMATS), help="source layout")
    p.add_argument("--source", required=True, help="folder (authors), parquet file/folder, or jsonl file/folder")
    p.add_argument("--data-dir", required=True, help="TFDS data dir to write into")
    p.add_argument("--name", default=None, help="dataset config name (default: the format)")
    p.add_argument("--strict", action="store_true", help="fail on the first bad item instead of skipping it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset of that name")
    p.add_argument("--workers", type=int, default=None,
                   help="threads reading and checking images (default: min(8, cores); plain build)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--beam", action="store_true", help="build through an Apache Beam pipeline (the [beam] extra)")
    p.add_argument("--beam_pipeline_options", "--beam-pipeline-options", default=None, metavar="K=V,...",
                   help="Beam pipeline options, e.g. runner=DirectRunner,direct_num_workers=2 "
                        "(default runner: DirectRunner); implies --beam")
    args = p.parse_args(argv)
    try:
        report = build_dataset(args.format, args.source, args.data_dir, args.name, strict=args.strict,
                               overwrite=args.overwrite, workers=args.workers, progress=not args.no_progress,
                               beam=args.beam or args.beam_pipeline_options is not None,
                               beam_pipeline_options=args.beam_pipeline_options)
    except Ip2pError as e:  # BuildError, SourceError: one clear message
        print(f"build_tfds: error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
