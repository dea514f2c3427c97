"""TFDS build from the three source formats: read-back equality, splits, bad items, atomicity."""
import json
import os

import pytest

import data_helpers as dh
from ip2p_jax.data import builder as B
from ip2p_jax.data import sources as S



def _check_readback(builder, expected: dict, split_key: str = "prompt_id"):
    """Every source pair is in exactly one split, with identical texts and image bytes."""
    seen, prompt_split = {}, {}
    for split in builder.info.splits:
        records = dh.read_split(builder, split)
        hashes = B.read_prompt_hashes(builder, split)
        for rec, h in zip(records, hashes):
            assert rec["id"] not in seen
            seen[rec["id"]] = rec
            assert S.split_of(rec["prompt_id"]) == split
            assert S.prompt_hash(rec["prompt_id"]) == h  # the side file lines up with the records
            assert prompt_split.setdefault(rec["prompt_id"], split) == split  # no prompt in two splits
    assert sorted(seen) == sorted(expected)
    for id_, want in expected.items():
        got = seen[id_]
        for k in ("instruction", "input_caption", "edited_caption", "input_image", "edited_image"):
            assert got[k] == want[k], (id_, k)
        if "prompt_id" in want:
            assert got["prompt_id"] == want["prompt_id"]
    return {s: sorted(r["id"] for r in seen.values() if S.split_of(r["prompt_id"]) == s) for s in B.src.SPLITS}


def test_authors_builds_and_reads_back(tmp_path):
    expected = dh.write_authors(str(tmp_path / "src"), n_prompts=40)
    report = B.build_dataset("authors", str(tmp_path / "src"), str(tmp_path / "d1"), "ip2p", progress=False)
    assert report.total == 80 and report.rejected == 0
    assert set(report.examples) == {"train", "validation", "test"} and report.num_bytes["train"] > 0
    splits = _check_readback(B.open_dataset(str(tmp_path / "d1"), "ip2p"), expected)
    assert len(splits["train"]) > len(splits["validation"]) > 0
    # stable across rebuilds (and without seeds.json: seeds listed from the files)
    os.remove(tmp_path / "src" / "seeds.json")
    B.build_dataset("authors", str(tmp_path / "src"), str(tmp_path / "d2"), "ip2p", progress=False)
    assert _check_readback(B.open_dataset(str(tmp_path / "d2"), "ip2p"), expected) == splits
    # the builder's records keep the source order (so prompt seeds stay adjacent)
    ids = [r["id"] for r in dh.read_split(B.open_dataset(str(tmp_path / "d1"), "ip2p"), "train")]
    assert ids == sorted(ids)
    with open(tmp_path / "d1" / "edit_pairs" / "ip2p" / "1.0.0" / "build_report.json") as f:
        assert json.load(f)["examples"] == report.examples


@pytest.mark.parametrize("layout", ["hf", "diffusers"])
def test_parquet_builds_and_reads_back(tmp_path, layout):
    expected = dh.write_parquet(str(tmp_path / "src"), n_files=2, rows=10, layout=layout)
    report = B.build_dataset("parquet", str(tmp_path / "src"), str(tmp_path / "d"), progress=False)
    assert report.total == 20 and report.rejected == 0
    _check_readback(B.open_dataset(str(tmp_path / "d"), "parquet"), expected)


def test_jsonl_builds_and_reads_back(tmp_path):
    expected = dh.write_jsonl(str(tmp_path / "src"), n=16)
    report = B.build_dataset("jsonl", str(tmp_path / "src" / "pairs.jsonl"), str(tmp_path / "d"), "mine",
                             progress=False, workers=1)
    assert report.total == 16 and report.rejected == 0
    builder = B.open_dataset(str(tmp_path / "d" / "edit_pairs" / "mine" / "1.0.0"))
    _check_readback(builder, expected)
    # also readable through TFDS' own entry point, with the default (PIL) image decoding
    import tensorflow_datasets as tfds
    ds = tfds.data_source("edit_pairs/mine", data_dir=str(tmp_path / "d"), split="train")
    assert ds[0]["input_image"].shape == (32, 32, 3)


def test_bad_items_skipped_and_reported(tmp_path):
    src = tmp_path / "src"
    dh.write_jsonl(str(src), n=6)
    good = (src / "img" / "0_out.jpg").read_bytes()
    (src / "img" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (src / "img" / "garbage.jpg").write_bytes(good[:20] + bytes(200))
    extra = [
        json.dumps({"input_image": "img/truncated.jpg", "edited_image": "img/0_out.jpg", "instruction": "a"}),
        json.dumps({"input_image": "img/0_in.png", "edited_image": "img/garbage.jpg", "instruction": "b"}),
        json.dumps({"input_image": "img/nope.png", "edited_image": "img/0_out.jpg", "instruction": "c"}),
        '{"input_image": "img/0_in.png", "edited_image": ',
        json.dumps({"input_image": "img/0_in.png", "edited_image": "img/0_out.jpg"}),
        json.dumps({"input_image": "img/0_in.png", "edited_image": "img/0_out.jpg", "instruction": "  "}),
    ]
    with open(src / "pairs.jsonl", "a") as f:
        f.write("\n".join(extra) + "\n")
    report = B.build_dataset("jsonl", str(src), str(tmp_path / "d"), progress=False)
    assert report.total == 6 and report.rejected == 6
    assert report.rejected_by_kind == {"corrupt image": 2, "missing image file": 1, "malformed JSON line": 1,
                                       "missing field": 1, "empty instruction": 1}
    text = report.summary()
    assert "pairs.jsonl:7: corrupt image" in text and "pairs.jsonl:10: malformed JSON line" in text
    assert "img/nope.png" in text


def test_bad_authors_and_parquet_items(tmp_path):
    dh.write_authors(str(tmp_path / "a"), n_prompts=6)
    (tmp_path / "a" / "0000001" / "103_1.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    os.remove(tmp_path / "a" / "0000002" / "207_0.jpg")
    os.remove(tmp_path / "a" / "0000003" / "prompt.json")
    report = B.build_dataset("authors", str(tmp_path / "a"), str(tmp_path / "d"), progress=False)
    assert report.total == 12 - 4
    assert report.rejected_by_kind == {"corrupt image": 1, "missing image file": 1, "missing prompt.json": 2}
    assert any(r.startswith("0000001/103: corrupt image") for r in report.rejections)

    import pyarrow as pa
    import pyarrow.parquet as pq
    dh.write_parquet(str(tmp_path / "p"), n_files=1, rows=8)
    pq.write_table(pa.table({"edit_prompt": ["x"], "edited_image": [b"y"]}), tmp_path / "p" / "bad.parquet")
    report = B.build_dataset("parquet", str(tmp_path / "p"), str(tmp_path / "d"), progress=False)
    assert report.total == 8 and report.rejected_by_kind == {"missing columns": 1}
    assert "bad.parquet: missing columns (['original_image']" in report.summary()


def test_strict_fails_naming_item_and_leaves_nothing(tmp_path):
    src = tmp_path / "src"
    dh.write_jsonl(str(src), n=30)
    os.remove(src / "img" / "17_out.jpg")
    data = tmp_path / "d"
    with pytest.raises(B.BuildError, match=r"pairs.jsonl:18: missing image file .*17_out.jpg"):
        B.build_dataset("jsonl", str(src), str(data), strict=True, progress=False)
    assert os.listdir(data) == []  # no dataset, no temporary leftovers
    # a crash mid-way leaves nothing either, and an existing dataset survives a failed rebuild
    (src / "img" / "17_out.jpg").write_bytes(dh.image_bytes(1))
    B.build_dataset("jsonl", str(src), str(data), progress=False)
    before = sorted(os.listdir(B.dataset_dir(data, "jsonl")))
    os.remove(src / "img" / "3_in.png")
    with pytest.raises(B.BuildError, match="pairs.jsonl:4"):
        B.build_dataset("jsonl", str(src), str(data), strict=True, overwrite=True, progress=False)
    assert sorted(os.listdir(data)) == ["edit_pairs"]
    assert sorted(os.listdir(B.dataset_dir(data, "jsonl"))) == before
    with pytest.raises(B.BuildError, match="already exists"):
        B.build_dataset("jsonl", str(src), str(data), progress=False)


def test_crash_midway_leaves_nothing(tmp_path, monkeypatch):
    dh.write_jsonl(str(tmp_path / "src"), n=12)
    calls = []

    def flaky(pair):
        calls.append(pair)
        if len(calls) == 7:
            raise RuntimeError("disk on fire")
        return real(pair)

    real = S.load_pair
    monkeypatch.setattr(S, "load_pair", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        B.build_dataset("jsonl", str(tmp_path / "src"), str(tmp_path / "d"), progress=False, workers=1)
    assert os.listdir(tmp_path / "d") == []


def test_empty_sources_fail_clearly(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(B.BuildError, match="holds no pairs"):
        B.build_dataset("jsonl", str(tmp_path / "empty.jsonl"), str(tmp_path / "d"), progress=False)
    (tmp_path / "authors").mkdir()
    with pytest.raises(B.BuildError, match="holds no pairs"):
        B.build_dataset("authors", str(tmp_path / "authors"), str(tmp_path / "d"), progress=False)
    with pytest.raises(S.SourceError, match="no parquet files"):
        B.build_dataset("parquet", str(tmp_path / "authors"), str(tmp_path / "d"), progress=False)
    # every item bad: clear error rather than an empty dataset
    (tmp_path / "bad.jsonl").write_text(json.dumps({"input_image": "x.png", "edited_image": "y.png",
                                                    "instruction": "z"}) + "\n")
    with pytest.raises(B.BuildError, match="every pair was rejected"):
        B.build_dataset("jsonl", str(tmp_path / "bad.jsonl"), str(tmp_path / "d"), progress=False)
    assert os.listdir(tmp_path / "d") == []


def test_split_left_empty_by_rejections_is_dropped(tmp_path):
    expected = dh.write_jsonl(str(tmp_path / "src"), n=40)
    test_items = [k for k, v in expected.items() if S.split_of(v["prompt_id"]) == "test"]
    assert test_items
    for k in test_items:
        os.remove(tmp_path / "src" / expected[k]["prompt_id"])
    report = B.build_dataset("jsonl", str(tmp_path / "src"), str(tmp_path / "d"), progress=False)
    assert "test" not in report.examples and report.rejected == len(test_items)
    builder = B.open_dataset(report.path)
    assert set(builder.info.splits) == {"train", "validation"}
    assert not os.path.exists(B.prompt_hash_file(report.path, "test"))


def test_many_shards_keep_order(tmp_path, monkeypatch):
    """Large splits stream into several array_record files; record order (and the side file) hold."""
    monkeypatch.setattr(B.EditPairs, "shard_bytes", 4000)
    expected = dh.write_authors(str(tmp_path / "src"), n_prompts=30, seeds=(1, 2, 3))
    B.build_dataset("authors", str(tmp_path / "src"), str(tmp_path / "d"), progress=False)
    builder = B.open_dataset(str(tmp_path / "d"), "authors")
    assert builder.info.splits["train"].num_shards > 5
    _check_readback(builder, expected)
    ids = [r["id"] for r in dh.read_split(builder, "train")]
    assert ids == sorted(ids)


def test_script(tmp_path, capsys):
    script = dh.build_tfds_script()
    dh.write_jsonl(str(tmp_path / "src"), n=8)
    os.remove(tmp_path / "src" / "img" / "2_in.png")
    argv = ["--format", "jsonl", "--source", str(tmp_path / "src"), "--data-dir", str(tmp_path / "d"),
            "--name", "mine", "--no-progress"]
    assert script.main(argv) == 0
    out = capsys.readouterr().out
    assert "rejected: 1" in out and "missing image file" in out and "examples/s" in out
    assert script.main(argv + ["--strict", "--overwrite"]) == 2
    assert "pairs.jsonl:3: missing image file" in capsys.readouterr().err
