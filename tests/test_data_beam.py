"""The TFDS build through an Apache Beam pipeline (DirectRunner) equals the plain build."""
import builtins
import logging
import os

import pytest

import data_helpers as dh
from ip2p_jax.data import beam_build
from ip2p_jax.data import builder as B
from ip2p_jax.data import sources as S
from test_data_build import _check_readback

pytest.importorskip("apache_beam")

TWO_WORKERS = "runner=DirectRunner,direct_num_workers=2,direct_running_mode=multi_processing"
IN_PROCESS = "runner=DirectRunner"


def _same_datasets(plain: str, beam: str, name: str, expected: dict) -> None:
    """Same splits, same records (every feature, images as bytes, in order), same prompt-hash side
    files. (The shard files themselves differ between any two processes, the plain build's too:
    the protobuf maps of the serialized examples have no fixed order.)"""
    a, b = B.open_dataset(plain, name), B.open_dataset(beam, name)
    assert sorted(a.info.splits) == sorted(b.info.splits)
    for split in a.info.splits:
        ra, rb = dh.read_split(a, split), dh.read_split(b, split)
        assert ra and ra == rb, split
        assert (B.read_prompt_hashes(a, split) == B.read_prompt_hashes(b, split)).all()
    assert _check_readback(a, expected) == _check_readback(b, expected)


def _bad_authors(root: str, n_prompts: int) -> dict:
    expected = dh.write_authors(root, n_prompts=n_prompts)
    with open(os.path.join(root, "0000005", "503_1.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 not really a jpeg")
    del expected["0000005/503"]
    return expected


def test_two_worker_beam_build_equals_plain(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(S.AuthorsSource, "unit_prompts", 7)   # several units: their order must hold
    expected = _bad_authors(str(tmp_path / "src"), n_prompts=30)
    plain = B.build_dataset("authors", str(tmp_path / "src"), str(tmp_path / "plain"), "ip2p", progress=False)
    with caplog.at_level(logging.INFO, logger="ip2p_jax.data.builder"):
        beam = B.build_dataset("authors", str(tmp_path / "src"), str(tmp_path / "beam"), "ip2p", progress=False,
                               beam=True, beam_pipeline_options=TWO_WORKERS)
    assert "Beam pipeline done: pairs 59, rejected 1" in caplog.text   # the workers' counters
    assert beam.examples == plain.examples and beam.total == 59
    assert set(beam.examples) == {"train", "validation", "test"}
    _same_datasets(str(tmp_path / "plain"), str(tmp_path / "beam"), "ip2p", expected)
    # the bad item reported the same way
    assert beam.rejected == plain.rejected == 1 and beam.rejected_by_kind == {"corrupt image": 1}
    assert beam.rejections == plain.rejections and beam.rejections[0].startswith("0000005/503: corrupt image")
    assert "0000005/503: corrupt image" in beam.summary()
    assert os.listdir(tmp_path / "beam") == ["edit_pairs"]   # no temporary leftovers
    assert os.stat(B.prompt_hash_file(beam.path, "train")).st_mode & 0o777 == 0o644


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_beam_build_of_file_sources_equals_plain(tmp_path, fmt):
    if fmt == "jsonl":
        expected = dh.write_jsonl(str(tmp_path / "src"), n=12, name="a.jsonl")
        expected.update(dh.write_jsonl(str(tmp_path / "src"), n=10, name="b.jsonl"))
        with open(tmp_path / "src" / "b.jsonl", "a") as f:
            f.write('{"input_image": "img/0_in.png", "edited_image": \n')
    else:
        expected = dh.write_parquet(str(tmp_path / "src"), n_files=3, rows=10)
    plain = B.build_dataset(fmt, str(tmp_path / "src"), str(tmp_path / "plain"), progress=False)
    beam = B.build_dataset(fmt, str(tmp_path / "src"), str(tmp_path / "beam"), progress=False,
                           beam=True, beam_pipeline_options=IN_PROCESS)
    assert beam.examples == plain.examples and beam.rejections == plain.rejections
    _same_datasets(str(tmp_path / "plain"), str(tmp_path / "beam"), fmt, expected)


def test_beam_strict_and_empty_split_fail_clearly(tmp_path):
    _bad_authors(str(tmp_path / "src"), n_prompts=8)
    with pytest.raises(B.BuildError) as plain:
        B.build_dataset("authors", str(tmp_path / "src"), str(tmp_path / "d"), strict=True, progress=False)
    with pytest.raises(B.BuildError) as beam:
        B.build_dataset("authors", str(tmp_path / "src"), str(tmp_path / "d"), strict=True, progress=False,
                        beam=True, beam_pipeline_options=IN_PROCESS)
    assert str(beam.value) == str(plain.value) and "0000005/503: corrupt image" in str(beam.value)
    assert os.listdir(tmp_path / "d") == []
    # a split whose every pair is bad: the plain build drops it, the Beam build says why it cannot
    expected = dh.write_jsonl(str(tmp_path / "j"), n=40)
    for k, v in expected.items():
        if S.split_of(v["prompt_id"]) == "test":
            os.remove(tmp_path / "j" / v["prompt_id"])
    with pytest.raises(B.BuildError, match="split test: every pair was rejected"):
        B.build_dataset("jsonl", str(tmp_path / "j"), str(tmp_path / "d"), progress=False,
                        beam=True, beam_pipeline_options=IN_PROCESS)
    assert os.listdir(tmp_path / "d") == []


def test_missing_beam_names_the_extra(tmp_path, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_beam(name, *args, **kwargs):
        if name == "apache_beam" or name.startswith("apache_beam."):
            raise ImportError("No module named 'apache_beam'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_beam)
    dh.write_jsonl(str(tmp_path / "src"), n=4)
    with pytest.raises(beam_build.BeamUnavailable, match=r"pip install 'ip2p_jax\[beam\]'"):
        B.build_dataset("jsonl", str(tmp_path / "src"), str(tmp_path / "d"), progress=False, beam=True)
    assert not os.path.exists(tmp_path / "d")
    # the plain build never needs it
    assert B.build_dataset("jsonl", str(tmp_path / "src"), str(tmp_path / "d"), progress=False).total == 4
    script = dh.build_tfds_script()
    argv = ["--format", "jsonl", "--source", str(tmp_path / "src"), "--data-dir", str(tmp_path / "d2"),
            "--no-progress", "--beam"]
    assert script.main(argv) == 2
    assert "pip install 'ip2p_jax[beam]'" in capsys.readouterr().err


def test_script_beam_build(tmp_path, capsys):
    script = dh.build_tfds_script()
    dh.write_jsonl(str(tmp_path / "src"), n=8)
    os.remove(tmp_path / "src" / "img" / "2_in.png")
    argv = ["--format", "jsonl", "--source", str(tmp_path / "src"), "--data-dir", str(tmp_path / "d"),
            "--name", "mine", "--no-progress", "--beam_pipeline_options", IN_PROCESS]
    assert script.main(argv) == 0
    out = capsys.readouterr().out
    assert "rejected: 1" in out and "pairs.jsonl:3: missing image file" in out
    assert B.open_dataset(str(tmp_path / "d"), "mine").info.splits.total_num_examples == 7
