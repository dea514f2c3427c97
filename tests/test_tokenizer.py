"""tokenize / load_tokenizer against transformers' CLIPTokenizer (the reference)."""
import json
import logging
import os

import numpy as np
import pytest

import tiny
import pickle

from ip2p_jax.tokenizer import TokenizerError, fast_tokenizer, load_tokenizer, tokenize

TEXTS = ["make it winter", "Turn the  RED dog\tinto a cat!!", "", "ünïcode, photo of the sky?",
         " ".join(["winter"] * 90), "it's the dog's background"]


def _reference(tok, texts):
    return np.asarray(tok(texts, padding="max_length", max_length=77, truncation=True)["input_ids"], np.int32)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    ref = tiny.tokenizer(str(root / "bpe"))           # vocab.json + merges.txt (older hub layout)
    ref.save_pretrained(str(root / "model" / "tokenizer"))  # transformers 5: tokenizer.json only
    return root, ref


def test_layouts_match_reference(folders):
    root, ref = folders
    assert os.path.exists(root / "model" / "tokenizer" / "tokenizer.json")
    assert not os.path.exists(root / "model" / "tokenizer" / "vocab.json")
    want = _reference(ref, TEXTS)
    assert want[0, 0] == ref.bos_token_id and want[4, -1] == ref.eos_token_id
    for path in (root / "bpe", root / "model", root / "model" / "tokenizer"):
        got = tokenize(load_tokenizer(str(path)), TEXTS)
        assert got.dtype == np.int32 and got.shape == (len(TEXTS), 77)
        np.testing.assert_array_equal(got, want)
    single = tokenize(load_tokenizer(str(root / "bpe")), "make it winter")
    np.testing.assert_array_equal(single, want[:1])
    # the picklable fast form the input pipeline ships to worker processes
    fast = pickle.loads(pickle.dumps(fast_tokenizer(load_tokenizer(str(root / "model")))))
    np.testing.assert_array_equal(tokenize(fast, TEXTS), want)


def test_custom_pad_token_and_length(folders, tmp_path):
    root, _ = folders
    # SD 2 tokenizers pad with "!" instead of <|endoftext|>.
    vocab, merges = tiny.tokenizer_files(str(tmp_path))
    with open(tmp_path / "tokenizer_config.json", "w") as f:
        json.dump({"pad_token": "!", "model_max_length": 77}, f)
    tok = load_tokenizer(str(tmp_path))
    from transformers import CLIPTokenizer
    ref = CLIPTokenizer(vocab, merges, pad_token="!", model_max_length=77)
    assert tok.pad_token_id == ref.pad_token_id != ref.eos_token_id
    np.testing.assert_array_equal(tokenize(tok, TEXTS), _reference(ref, TEXTS))
    short = tokenize(tok, TEXTS, max_length=8)
    np.testing.assert_array_equal(
        short, np.asarray(ref(TEXTS, padding="max_length", max_length=8, truncation=True)["input_ids"]))


def test_truncation_warns(folders, caplog):
    root, _ = folders
    tok = load_tokenizer(str(root / "bpe"))
    with caplog.at_level(logging.WARNING, logger="ip2p_jax.tokenizer"):
        tokenize(tok, ["make it winter"])
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="ip2p_jax.tokenizer"):
        tokenize(tok, [" ".join(["dog"] * 100)])
    assert "truncated" in caplog.text


def test_missing_tokenizer_is_clear(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer found"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(TokenizerError, match="no such directory"):
        load_tokenizer(str(tmp_path / "nope"))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot load"):
        load_tokenizer(str(tmp_path))
