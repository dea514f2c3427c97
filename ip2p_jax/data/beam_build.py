"""The edit-pairs build as an Apache Beam pipeline (`build_dataset(..., beam=True)`), for sources
too large for one process.

The source is cut into units (`source.units()`: its files, or ranges of prompt folders); workers
scan them, read and check every pair (`sources.load_or_reject`) and route it to its split by
prompt hash. Every pair is keyed by its place in the source, and TFDS' Beam writer (ordered, since
the builder disables shuffling) writes each split's array_record shards in key order: the records,
and the prompt-hash side files written beside them, come out exactly as the plain build writes
them. Bad items go to a side output, collected into one JSON file that the launching process
reads back into the build report (in source order, as the plain build reports them).

All paths (source, data dir) must be visible to the workers as well as to the launching process.
apache_beam is imported only here, and only when a Beam build runs (the `[beam]` extra).
"""
from __future__ import annotations

import json
import os
import struct

from ip2p_jax import files
from ip2p_jax.data import sources as src
from ip2p_jax.errors import Ip2pError

KEY_BITS = 32   # key = unit index << KEY_BITS | item index within the unit: the source order
REJECTED = "rejected"


class BeamUnavailable(Ip2pError):
    """A Beam build was asked for without Apache Beam installed."""


def import_beam():
    try:
        import apache_beam as beam
    except ImportError as e:
        raise BeamUnavailable(f"the Beam build needs Apache Beam, which is not installed ({e}); "
                              "install it with: pip install 'ip2p_jax[beam]'") from None
    return beam


def pipeline_options(text: str | None):
    """PipelineOptions from `runner=DirectRunner,direct_num_workers=2,...` (the form of
    `tfds build --beam_pipeline_options`); the runner defaults to DirectRunner, the workers' log
    level to WARNING."""
    beam = import_beam()
    flags = [f"--{kv.strip()}" for kv in (text or "").split(",") if kv.strip()]
    if not any(f.startswith("--runner=") for f in flags):
        flags.insert(0, "--runner=DirectRunner")
    if not any(f.startswith("--default_sdk_harness_log_level=") for f in flags):
        flags.append("--default_sdk_harness_log_level=WARNING")   # workers' INFO lines drown the summary
    _let_local_workers_import_this_copy()
    return beam.options.pipeline_options.PipelineOptions(flags)


def _let_local_workers_import_this_copy() -> None:
    """Worker processes a local runner starts import ip2p_jax afresh: the copy running here."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([root] + [p for p in paths if p])


# ---------------------------------------------------------------- pipeline steps (run on workers)

def _scan(indexed_unit, source):
    index, unit = indexed_unit
    for i, item in enumerate(source.scan_unit(unit)):
        yield (index << KEY_BITS) | i, item


def _load(keyed_item):
    beam = import_beam()
    key, item = keyed_item
    out = item if isinstance(item, src.Rejection) else src.load_or_reject(item)
    if isinstance(out, src.Rejection):
        beam.metrics.Metrics.counter("edit_pairs", "rejected").inc()
        yield beam.pvalue.TaggedOutput(REJECTED, (key, out.item, out.kind, out.detail))
    else:
        beam.metrics.Metrics.counter("edit_pairs", "pairs").inc()
        yield key, out


def _keyed_hash(keyed_example):
    return keyed_example[0], src.prompt_hash(keyed_example[1]["prompt_id"])


def _split_index(keyed_example, n: int) -> int:
    return src.SPLITS.index(src.split_of(keyed_example[1]["prompt_id"]))


def _write_hashes(keyed_hashes: list, path: str) -> None:
    with files.atomic_file(path) as f:
        f.write(b"".join(struct.pack("<Q", h) for _, h in sorted(keyed_hashes)))


def _write_rejections(rows: list, path: str) -> None:
    files.write_json(path, sorted(rows), indent=None)


# ---------------------------------------------------------------- the pipeline

def split_pcollections(pipeline, source, splits, hash_paths: dict, rejections_path: str) -> dict:
    """{split: PCollection of (key, example)} for `splits`, reading `source` once; also writes
    each split's prompt hashes to `hash_paths[split]` and every rejection to `rejections_path`."""
    beam = import_beam()
    units = list(enumerate(source.units()))
    loaded = (pipeline
              | "Units" >> beam.Create(units)
              | "SpreadUnits" >> beam.Reshuffle()
              | "Scan" >> beam.FlatMap(_scan, source)
              | "SpreadPairs" >> beam.Reshuffle()   # a unit's pairs are read by many workers
              | "ReadAndCheck" >> beam.FlatMap(_load).with_outputs(REJECTED, main="pairs"))
    _ = (loaded[REJECTED]
         | "CollectRejections" >> beam.combiners.ToList()
         | "WriteRejections" >> beam.Map(_write_rejections, rejections_path))
    parts = loaded.pairs | "BySplit" >> beam.Partition(_split_index, len(src.SPLITS))
    out = {}
    for split in splits:
        pcoll = parts[src.SPLITS.index(split)]
        _ = (pcoll
             | f"PromptHashes_{split}" >> beam.Map(_keyed_hash)
             | f"CollectHashes_{split}" >> beam.combiners.ToList()
             | f"WriteHashes_{split}" >> beam.Map(_write_hashes, hash_paths[split]))
        out[split] = pcoll
    return out


def counters(pipeline_result) -> dict[str, int]:
    """The pipeline's `edit_pairs` counters ({"pairs": n, "rejected": m}), where the runner keeps them."""
    beam = import_beam()
    try:
        query = pipeline_result.metrics().query(beam.metrics.MetricsFilter().with_namespace("edit_pairs"))
    except Exception:   # a runner without metrics support
        return {}
    out = {}
    for c in query["counters"]:
        out[c.key.metric.name] = out.get(c.key.metric.name, 0) + int(c.committed or c.attempted or 0)
    return out


def read_rejections(path: str) -> list[src.Rejection]:
    """The rejections the pipeline collected, in source order."""
    with open(path) as f:
        return [src.Rejection(item, kind, detail) for _, item, kind, detail in json.load(f)]
