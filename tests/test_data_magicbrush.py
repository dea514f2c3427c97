"""The MagicBrush layout (parquet: img_id, turn_index, source_img, mask_img, instruction,
target_img) through the TFDS builder: sessions of turns, masks kept, bad rows named."""
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import data_helpers as dh
from ip2p_jax.data import builder as B
from ip2p_jax.data import sources as S

SESSIONS = {"101": 3, "202": 1, "303": 2, "404": 2}   # img_id -> number of turns


def text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def mask_png(seed: int, size: int = 32) -> bytes:
    """An RGBA mask like MagicBrush's (the edit region transparent)."""
    a = np.full((size, size, 4), 255, np.uint8)
    a[seed % 8: seed % 8 + 10, 4:20, 3] = 0
    buf = io.BytesIO()
    Image.fromarray(a, "RGBA").save(buf, format="PNG")
    return buf.getvalue()


def rows(sessions: dict, as_struct: bool):
    """MagicBrush rows; turn t's source is turn t-1's target, as in the dataset."""
    out = []
    for sid, turns in sessions.items():
        prev = dh.image_bytes(int(sid), fmt="PNG")
        for t in range(1, turns + 1):
            target = dh.image_bytes(int(sid) * 10 + t, fmt="PNG")
            cell = (lambda b: {"bytes": b, "path": f"{sid}-{t}.png"}) if as_struct else (lambda b: b)
            out.append({"img_id": sid, "turn_index": t, "source_img": cell(prev),
                        "mask_img": cell(mask_png(int(sid) + t)), "instruction": f"turn {t} of {sid}",
                        "target_img": cell(target)})
            prev = target
    return out


def write(path, records, struct=True):
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())]) if struct else pa.binary()
    schema = pa.schema([("img_id", pa.string()), ("turn_index", pa.int64()), ("source_img", image),
                        ("mask_img", image), ("instruction", pa.string()), ("target_img", image)])
    pq.write_table(pa.Table.from_pylist(records, schema=schema), path)


def test_magicbrush_parquet_builds_and_reads_back_with_turns_and_masks(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    part1 = {k: SESSIONS[k] for k in ("101", "202")}
    part2 = {k: SESSIONS[k] for k in ("303", "404")}
    write(src / "train-00000-of-00002.parquet", rows(part1, True))          # HF datasets' {bytes, path} structs
    bad = rows(part2, False)
    bad.append({**bad[-1], "turn_index": 3, "target_img": None})             # a row missing its target
    write(src / "train-00001-of-00002.parquet", bad, struct=False)          # raw bytes
    report = B.build_dataset("magicbrush", str(src), str(tmp_path / "d"), name="mb", workers=1, progress=False)
    assert report.rejected == 1 and report.rejected_by_kind == {"missing target image": 1}
    assert report.rejections == ["train-00001-of-00002.parquet#4: missing target image "
                                 "(img_id 404 turn 3: target_img is empty)"]
    builder = B.open_dataset(str(tmp_path / "d"), "mb")
    assert "turn_index" in builder.info.features and "mask_image" in builder.info.features
    want = {(r["img_id"], r["turn_index"]): r for r in rows(part1, False) + rows(part2, False)}
    got = {}
    for split in builder.info.splits:
        records = B.encoded_source(builder, split)   # what readers use: images (and masks) stay encoded
        for i in range(len(records)):
            rec = records[i]
            got[(text(rec["prompt_id"]), int(rec["turn_index"]))] = (split, rec)
    assert sorted(got) == sorted(want)
    for key, (split, rec) in got.items():
        w = want[key]
        assert rec["mask_image"] == w["mask_img"] and rec["input_image"] == w["source_img"]
        assert rec["edited_image"] == w["target_img"]
        assert text(rec["instruction"]) == w["instruction"] and text(rec["id"]) == f"{key[0]}-{key[1]}"
    # every turn of a session is in the split of its img_id
    for sid in SESSIONS:
        assert len({got[k][0] for k in got if k[0] == sid}) == 1


def test_magicbrush_strict_and_column_errors_name_the_file(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    records = rows({"7": 2}, True)
    records[1]["target_img"] = {"bytes": None, "path": None}
    write(src / "a.parquet", records)
    with pytest.raises(B.BuildError, match=r"a.parquet#1: missing target image \(img_id 7 turn 2"):
        B.build_dataset("magicbrush", str(src), str(tmp_path / "d"), strict=True, workers=1, progress=False)
    other = tmp_path / "other"
    other.mkdir()
    pq.write_table(pa.table({"img_id": ["1"], "instruction": ["x"]}), other / "b.parquet")
    dh.write_parquet(str(other), n_files=1, rows=2)   # plus a valid file of another layout: rejected as a whole
    with pytest.raises(B.BuildError, match="other: the magicbrush source holds no pairs"):
        B.build_dataset("magicbrush", str(other), str(tmp_path / "d2"), workers=1, progress=False)
    mapping = S.MagicBrushSource(str(other))._mapping(str(other / "b.parquet"))
    assert mapping.kind == "missing columns" and "turn_index" in mapping.detail and "target_img" in mapping.detail


def test_plain_parquet_datasets_have_no_session_features(tmp_path):
    dh.write_parquet(str(tmp_path / "p"), n_files=1, rows=6)
    B.build_dataset("parquet", str(tmp_path / "p"), str(tmp_path / "d"), workers=1, progress=False)
    assert "turn_index" not in B.open_dataset(str(tmp_path / "d"), "parquet").info.features


def test_magicbrush_beam_build_equals_plain(tmp_path):
    pytest.importorskip("apache_beam")
    src = tmp_path / "src"
    src.mkdir()
    write(src / "a.parquet", rows(SESSIONS, True))
    plain = B.build_dataset("magicbrush", str(src), str(tmp_path / "plain"), workers=1, progress=False)
    beam = B.build_dataset("magicbrush", str(src), str(tmp_path / "beam"), progress=False, beam=True,
                           beam_pipeline_options="runner=DirectRunner")
    assert beam.examples == plain.examples
    a, b = B.open_dataset(str(tmp_path / "plain"), "magicbrush"), B.open_dataset(str(tmp_path / "beam"), "magicbrush")
    for split in a.info.splits:
        ra, rb = B.encoded_source(a, split), B.encoded_source(b, split)
        assert len(ra) == len(rb)
        for i in range(len(ra)):
            assert {k: ra[i][k] for k in ("id", "turn_index", "mask_image", "edited_image")} == \
                   {k: rb[i][k] for k in ("id", "turn_index", "mask_image", "edited_image")}


def test_magicbrush_dataset_feeds_the_training_pipeline(tmp_path):
    """What the finetune preset trains on: batches of source/target turns (the extra features are ignored)."""
    import tiny
    from ip2p_jax.data.augment import AugmentConfig
    from ip2p_jax.data.pipeline import EditPairPipeline, PipelineConfig

    src = tmp_path / "src"
    src.mkdir()
    write(src / "a.parquet", rows({str(i): 2 for i in range(500, 520)}, True))
    B.build_dataset("magicbrush", str(src), str(tmp_path / "d"), workers=1, progress=False)
    cfg = PipelineConfig(global_batch_size=4, augment=AugmentConfig(min_resize=32, max_resize=32, crop_size=32))
    pipe = EditPairPipeline(B.open_dataset(str(tmp_path / "d"), "magicbrush"), tiny.tokenizer(str(tmp_path / "tok")),
                            cfg, process_index=0, process_count=1)
    batch = next(iter(pipe))
    assert batch["input_image"].shape == batch["edited_image"].shape == (4, 32, 32, 3)
    assert batch["input_ids"].shape == (4, 77)
