"""The TFDS builder for edit pairs (array_record files; no TensorFlow needed) and `build_dataset`.

Layout: `<data_dir>/edit_pairs/<name>/1.0.0/` holding the TFDS files plus, per split,
`prompt_hashes-<split>.u64` (the 64-bit prompt hash of record i, for one-seed-per-prompt
sampling) and `build_report.json`. Records are stored in the order the source yields them.

The source is read once: the first split streams the source, writing its pairs straight to
array_record shards and spooling the other splits' pairs to temporary files, which their
generators then replay. The splits are written by this builder's own streaming shard writer
rather than TFDS' shuffling writer, whose on-disk buckets (used past 1 GB) need TensorFlow
and which would hold 1 GB in memory. Memory stays bounded whatever the source size.
A build runs in a temporary data dir and is moved into place only when complete.
With `beam=True` the same dataset is built by an Apache Beam pipeline instead (data/beam_build.py).
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import io
import json
import logging
import os
import pickle
import re
import shutil
import struct
import tempfile
import time
from typing import Iterable, Iterator

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import example_serializer
from tensorflow_datasets.core import writer as writer_lib
from tensorflow_datasets.core.utils import tqdm_utils

from ip2p_jax.errors import Ip2pError
from ip2p_jax.data import beam_build
from ip2p_jax.data import leftovers
from ip2p_jax.data import sources as src
from ip2p_jax.progress import progress

log = logging.getLogger(__name__)

DATASET = "edit_pairs"
VERSION = "1.0.0"
IMAGE_FEATURES = ("input_image", "edited_image")
TEXT_FEATURES = ("instruction", "input_caption", "edited_caption", "id", "prompt_id")
SESSION_FEATURES = ("turn_index", "mask_image")   # MagicBrush-layout datasets only (sessions of turns)
MAX_KEPT_REJECTIONS = 10_000
SHARD_BYTES = 1 << 30  # start a new array_record file past this size
# one record per group (random access), no compression (the images already are)
RECORD_OPTIONS = "group_size:1,uncompressed"


class BuildError(Ip2pError):
    """The build cannot produce a dataset (empty source, strict-mode rejection, ...)."""


def features(sessions: bool = False) -> tfds.features.FeaturesDict:
    """The dataset's features; `sessions` (MagicBrush layout) adds turn_index (int32) and
    mask_image (the mask's encoded bytes as the source gives them, b"" for none)."""
    # Images stay as the encoded bytes of the source (tfds.features.Image stores given bytes as-is).
    extra = {"turn_index": tfds.features.Scalar(np.int32),
             "mask_image": tfds.features.Tensor(shape=(), dtype=np.object_)} if sessions else {}
    return tfds.features.FeaturesDict({
        **extra,
        "input_image": tfds.features.Image(shape=(None, None, 3)),
        "edited_image": tfds.features.Image(shape=(None, None, 3)),
        "instruction": tfds.features.Text(),
        "input_caption": tfds.features.Text(),
        "edited_caption": tfds.features.Text(),
        "id": tfds.features.Text(),
        "prompt_id": tfds.features.Text(),
    })


def prompt_hash_file(version_dir, split: str) -> str:
    return os.path.join(os.fspath(version_dir), f"prompt_hashes-{split}.u64")


@dataclasses.dataclass
class BuildReport:
    path: str = ""
    source: str = ""
    format: str = ""
    examples: dict = dataclasses.field(default_factory=dict)   # split -> count
    num_bytes: dict = dataclasses.field(default_factory=dict)  # split -> bytes written
    rejected: int = 0
    rejected_by_kind: dict = dataclasses.field(default_factory=dict)
    rejections: list = dataclasses.field(default_factory=list)  # first MAX_KEPT_REJECTIONS, as text
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.examples.values())

    def reject(self, r: src.Rejection):
        self.rejected += 1
        self.rejected_by_kind[r.kind] = self.rejected_by_kind.get(r.kind, 0) + 1
        if len(self.rejections) < MAX_KEPT_REJECTIONS:
            self.rejections.append(str(r))

    def summary(self, max_lines: int = 20) -> str:
        rate = self.total / self.seconds if self.seconds else 0.0
        lines = [f"dataset: {self.path}", f"source: {self.source} ({self.format})"]
        for split, n in sorted(self.examples.items(), key=lambda kv: src.SPLITS.index(kv[0])):
            lines.append(f"  {split:<10} {n:>9} examples  {self.num_bytes.get(split, 0) / 2**20:10.1f} MiB")
        lines.append(f"  {'total':<10} {self.total:>9} examples  {sum(self.num_bytes.values()) / 2**20:10.1f} MiB")
        lines.append(f"time: {self.seconds:.1f} s ({rate:.1f} examples/s)")
        lines.append(f"rejected: {self.rejected}")
        for kind, n in sorted(self.rejected_by_kind.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {n:>7}  {kind}")
        for r in self.rejections[:max_lines]:
            lines.append(f"    {r}")
        if self.rejected > max_lines:
            lines.append(f"    ... ({self.rejected - max_lines} more in {os.path.join(self.path, 'build_report.json')})")
        return "\n".join(lines)


def _strict_error(r: src.Rejection) -> BuildError:
    return BuildError(f"{r} [--strict: the first bad item stops the build; without it bad items are "
                      "skipped and reported]")


# ---------------------------------------------------------------- reading the source once

def _ordered_map(fn, items: Iterable, workers: int, window: int) -> Iterator:
    """map(fn, items) in order, `workers` threads, at most `window` items in flight."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class _Spool:
    """Append-only file of pickled examples, replayed once."""

    def __init__(self, path: str):
        self.path, self._f = path, open(path, "wb")

    def write(self, example: dict):
        data = pickle.dumps(example, protocol=pickle.HIGHEST_PROTOCOL)
        self._f.write(struct.pack("<Q", len(data)))
        self._f.write(data)

    def replay(self) -> Iterator[dict]:
        self._f.close()
        with open(self.path, "rb") as f:
            while head := f.read(8):
                yield pickle.loads(f.read(struct.unpack("<Q", head)[0]))
        os.remove(self.path)


class _SplitRouter:
    """Streams the source once; the first split asked for is yielded live, the others spooled."""

    def __init__(self, source, report: BuildReport, strict: bool, workers: int, spool_dir: str,
                 planned: int, progress: bool):
        self.source, self.report, self.strict = source, report, strict
        self.workers, self.spool_dir, self.planned, self.progress = workers, spool_dir, planned, progress
        self.spools: dict[str, _Spool] | None = None

    def _checked(self) -> Iterator[dict]:
        def load(x):
            return x if isinstance(x, src.Rejection) else src.load_or_reject(x)

        bar = progress(total=self.planned, desc=f"reading {self.source.format} source", unit=" pairs",
                       enabled=self.progress)
        try:
            for out in _ordered_map(load, self.source.scan(), self.workers, 4 * self.workers):
                bar.update(1)
                if isinstance(out, src.Rejection):
                    if self.strict:
                        raise _strict_error(out)
                    self.report.reject(out)
                    bar.set_postfix_str(f"rejected={self.report.rejected}", refresh=False)
                    continue
                yield out
        finally:
            bar.close()

    def examples(self, split: str) -> Iterator[dict]:
        if self.spools is not None:
            yield from self.spools.pop(split).replay()
            return
        self.spools = {s: _Spool(os.path.join(self.spool_dir, f"spool-{s}.bin")) for s in src.SPLITS if s != split}
        for ex in self._checked():
            s = src.split_of(ex["prompt_id"])
            if s == split:
                yield ex
            else:
                self.spools[s].write(ex)


class _RecordWriter(writer_lib.ExampleWriter):
    """TFDS' shard writer (used by its Beam writer) with this builder's array_record options."""

    def write(self, path, examples):
        from array_record.python import array_record_module  # optional heavy dependency

        writer = array_record_module.ArrayRecordWriter(os.fspath(path), RECORD_OPTIONS)
        for _, data in examples:
            writer.write(data)
        writer.close()


# ---------------------------------------------------------------- the builder

class EditPairs(tfds.core.GeneratorBasedBuilder):
    """InstructPix2Pix edit pairs: input/edited images (encoded bytes), instruction, captions."""

    VERSION = tfds.core.Version(VERSION)
    shard_bytes = SHARD_BYTES

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):  # no checksums / metadata files ship with this builder
        return None

    def __init__(self, *, source=None, strict: bool = False, workers: int = 1, progress: bool = True,
                 report: BuildReport | None = None, beam: bool = False, **kwargs):
        self._source, self._strict, self._workers, self._progress = source, strict, workers, progress
        self._beam = beam
        self._report = report if report is not None else BuildReport()
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description=self.__doc__, disable_shuffling=True,
            features=features(sessions=getattr(self._source, "format", None) == "magicbrush"),
            homepage="https://github.com/timothybrooks/instruct-pix2pix")

    def rejections_path(self) -> str:
        """Where a Beam build's pipeline collects the rejected items."""
        return os.path.join(os.fspath(self.data_dir_root), "rejections.json")

    def _split_generators(self, dl_manager, pipeline=None):
        if self._source is None:
            raise BuildError("EditPairs needs a source to build (use build_dataset)")
        counts = collections.Counter(src.split_of(p) for p in self._source.plan())
        total = sum(counts.values())
        if total == 0:
            raise BuildError(f"{self._source.root}: the {self._source.format} source holds no pairs")
        order = [s for s in src.SPLITS if counts[s]]  # the largest (train) streams live
        order.sort(key=lambda s: -counts[s])
        if pipeline is not None:   # TFDS passes the Beam pipeline only to a Beam build
            return beam_build.split_pcollections(pipeline, self._source, order,
                                                 {s: prompt_hash_file(self.data_dir, s) for s in order},
                                                 self.rejections_path())
        spool_dir = tempfile.mkdtemp(prefix="spool-", dir=os.fspath(self.data_dir_root))
        self._router = _SplitRouter(self._source, self._report, self._strict, self._workers, spool_dir,
                                    total, self._progress)
        return {s: self._generate_examples(s) for s in order}

    def _generate_splits(self, dl_manager, download_config):
        if self._beam:   # TFDS' own split generation: its Beam pipeline and Beam writer
            return super()._generate_splits(dl_manager, download_config)
        infos = [self._write_split(split, examples) for split, examples in self._split_generators(dl_manager).items()]
        infos = [info for info in infos if info is not None]  # a split whose every pair was rejected
        if not infos:
            raise BuildError(f"{self._source.root}: every pair was rejected ({self._report.rejected}); "
                             "see the reasons above")
        return infos

    def _write_split(self, split: str, examples) -> tfds.core.SplitInfo | None:
        """Stream `examples` into array_record shards of about SHARD_BYTES, in order."""
        from array_record.python import array_record_module  # optional heavy dependency

        feats = self.info.features
        serializer = example_serializer.ExampleSerializer(feats.get_serialized_info())
        template = self._get_filename_template(split_name=split)
        shards, writer, shard_bytes, total_bytes = [], None, 0, 0
        for _, example in examples:
            if writer is None:
                path = os.path.join(os.fspath(self.data_path), f".shard-{split}-{len(shards):05d}")
                writer = array_record_module.ArrayRecordWriter(path, RECORD_OPTIONS)
                shards.append([path, 0])
            data = serializer.serialize_example(feats.encode_example(example))
            writer.write(data)
            shards[-1][1] += 1
            shard_bytes += len(data)
            total_bytes += len(data)
            if shard_bytes >= self.shard_bytes:
                writer.close()
                writer, shard_bytes = None, 0
        if writer is not None:
            writer.close()
        if not shards:
            os.remove(prompt_hash_file(self.data_dir, split))
            log.warning("split %s: every pair was rejected; the dataset has no %s split", split, split)
            return None
        for i, (path, _) in enumerate(shards):
            os.replace(path, os.fspath(template.sharded_filepath(shard_index=i, num_shards=len(shards))))
        return tfds.core.SplitInfo(name=split, shard_lengths=[n for _, n in shards], num_bytes=total_bytes,
                                   filename_template=template)

    def _process_pipeline_result(self, pipeline_result):
        self._counters = beam_build.counters(pipeline_result)
        log.info("Beam pipeline done: %s", ", ".join(f"{k} {v}" for k, v in sorted(self._counters.items())))

    def _example_writer(self):
        return _RecordWriter(self.info.file_format)   # TFDS' Beam writer writes the shards with it

    def _generate_examples(self, split: str):
        hashes = open(prompt_hash_file(self.data_dir, split), "wb")
        n = 0
        with hashes:
            for ex in self._router.examples(split):
                hashes.write(struct.pack("<Q", src.prompt_hash(ex["prompt_id"])))
                yield n, ex
                n += 1
        if n:
            self._report.examples[split] = n


# ---------------------------------------------------------------- entry points

def _check_name(name: str) -> str:
    if not re.fullmatch(r"[a-z0-9][a-z0-9_]*", name):
        raise BuildError(f"dataset name {name!r}: use lower-case letters, digits and '_'")
    return name


def dataset_dir(data_dir: str, name: str) -> str:
    return os.path.join(os.fspath(data_dir), DATASET, name, VERSION)


@contextlib.contextmanager
def _quiet_tfds():
    """TFDS' own progress bars, prints and warnings would duplicate (and confuse) ours."""
    was_enabled = tqdm_utils._active
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    tqdm_utils.display_progress_bar(False)
    absl_logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        tqdm_utils.display_progress_bar(was_enabled)
        absl_logger.setLevel(level)


def build_dataset(fmt: str, source: str, data_dir: str, name: str | None = None, *, strict: bool = False,
                  overwrite: bool = False, workers: int | None = None, progress: bool = True,
                  beam: bool = False, beam_pipeline_options: str | None = None) -> BuildReport:
    """Build `<data_dir>/edit_pairs/<name>/1.0.0` from a source; returns the report.

    Bad items are skipped and reported (or, with `strict`, the first one raises BuildError).
    Nothing is left at the final path unless the build completes.
    beam: build through an Apache Beam pipeline run with `beam_pipeline_options`
    ("runner=DirectRunner,direct_num_workers=2,..."; see docs/data.md) instead of in this process.
    """
    name = _check_name(name or fmt)
    download_config = (tfds.download.DownloadConfig(beam_options=beam_build.pipeline_options(beam_pipeline_options))
                       if beam else None)
    source_obj = src.open_source(fmt, source)
    final = dataset_dir(data_dir, name)
    _prepare_data_dir(data_dir)
    leftovers.clean_builds(data_dir)
    leftovers.recover_old(data_dir, name, final)
    if os.path.exists(final) and not overwrite:
        raise BuildError(f"{final} already exists (pass overwrite=True / --overwrite to replace it)")
    workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    report = BuildReport(path=final, source=os.fspath(source), format=fmt)
    try:
        tmp_root = tempfile.mkdtemp(prefix=f".build-{name}-", dir=data_dir)
        leftovers.write_owner(tmp_root)
    except OSError as e:
        raise BuildError(f"{data_dir}: cannot write the build there ({e.strerror or e})") from None
    start = time.perf_counter()
    try:
        with _quiet_tfds():
            builder = EditPairs(source=source_obj, strict=strict, workers=workers, progress=progress,
                                report=report, beam=beam, data_dir=tmp_root,
                                config=tfds.core.BuilderConfig(name=name), file_format="array_record")
            if beam:
                _prepare_with_beam(builder, download_config, report, strict)
            else:
                builder.download_and_prepare(download_dir=os.path.join(tmp_root, "downloads"))
        built = dataset_dir(tmp_root, name)
        info = builder.info
        report.num_bytes = {s: int(info.splits[s].num_bytes) for s in report.examples}
        report.seconds = time.perf_counter() - start
        with open(os.path.join(built, "build_report.json"), "w") as f:
            json.dump(dataclasses.asdict(report), f, indent=1)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        if os.path.exists(final):
            old = tempfile.mkdtemp(prefix=f".old-{name}-", dir=data_dir)
            os.replace(final, os.path.join(old, VERSION))
            os.replace(built, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(built, final)
    except OSError as e:   # full disk, read-only folder, ...: one line naming the path
        raise BuildError(f"{e.filename or data_dir}: the dataset build failed ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return report


def _prepare_with_beam(builder: EditPairs, download_config, report: BuildReport, strict: bool) -> None:
    try:
        builder.download_and_prepare(download_dir=os.path.join(builder.data_dir_root, "downloads"),
                                     download_config=download_config)
    except Exception as e:
        # TFDS' Beam writer cannot write an empty split (the plain build drops one)
        if m := re.search(r"number of generated examples is 0 for split (\w+)", str(e)):
            raise BuildError(f"split {m.group(1)}: every pair was rejected; a Beam build cannot write an "
                             "empty split (the plain build drops it): fix or remove those items") from None
        raise
    rejections = beam_build.read_rejections(builder.rejections_path())
    if strict and rejections:
        raise _strict_error(rejections[0])
    for r in rejections:
        report.reject(r)
    report.examples = {s: int(builder.info.splits[s].num_examples) for s in builder.info.splits}


def _prepare_data_dir(data_dir: str) -> None:
    if os.path.lexists(data_dir) and not os.path.isdir(data_dir):
        raise BuildError(f"--data-dir {data_dir}: exists and is not a folder")
    try:
        os.makedirs(data_dir, exist_ok=True)
    except OSError as e:
        raise BuildError(f"--data-dir {data_dir}: cannot create the folder ({e.strerror or e})") from None


def open_dataset(path: str, name: str | None = None):
    """A read-only TFDS builder: `open_dataset(data_dir, name)` or `open_dataset(version_dir)`."""
    version_dir = dataset_dir(path, name) if name else os.fspath(path)
    parts = os.path.abspath(version_dir).split(os.sep)
    if len(parts) > 3 and parts[-1] == VERSION and parts[-3] == DATASET:   # an interrupted --overwrite?
        leftovers.recover_old(os.sep.join(parts[:-3]) or os.sep, parts[-2], os.path.abspath(version_dir))
    if not os.path.exists(os.path.join(version_dir, "dataset_info.json")):
        raise BuildError(f"{version_dir}: no built dataset here (expected dataset_info.json; build it with "
                         "scripts/build_tfds.py)")
    return tfds.builder_from_directory(version_dir)


def encoded_source(builder, split: str):
    """Random-access records of `split` with the images left as their encoded bytes (no TensorFlow
    decoding; readers decode with PIL)."""
    return builder.as_data_source(split, decoders={k: tfds.decode.SkipDecoding() for k in IMAGE_FEATURES})


def read_prompt_hashes(builder, split: str) -> np.ndarray:
    """uint64 prompt hash of each record of `split`, in record order."""
    path = prompt_hash_file(builder.data_dir, split)
    hashes = np.fromfile(path, dtype="<u8")
    n = builder.info.splits[split].num_examples
    if len(hashes) != n:
        raise BuildError(f"{path}: {len(hashes)} prompt hashes for {n} records (dataset damaged?)")
    return hashes
