"""CLIP tokenisation to fixed-length int32 ids, as diffusers' pipelines and training script do.

`load_tokenizer(path)` accepts a model folder holding `tokenizer/`, or a tokenizer folder
holding either `tokenizer.json` (what transformers 5 saves) or `vocab.json` + `merges.txt`
(older hub folders). `tokenize(tok, texts)` pads with the tokenizer's pad token and truncates
to `max_length` (keeping the end-of-text token last, like `truncation=True`), with a warning.
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

MAX_LENGTH = 77


class TokenizerError(ValueError):
    """A tokenizer folder that cannot be found or read."""


def _tokenizer_dir(path: str) -> str:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise TokenizerError(f"{path}: no such directory (expected a model folder with tokenizer/ "
                             "or a tokenizer folder)")
    for candidate in (os.path.join(path, "tokenizer"), path):
        has_json = os.path.isfile(os.path.join(candidate, "tokenizer.json"))
        has_bpe = all(os.path.isfile(os.path.join(candidate, f)) for f in ("vocab.json", "merges.txt"))
        if has_json or has_bpe:
            return candidate
    raise TokenizerError(f"{path}: no tokenizer found: expected tokenizer.json or vocab.json + merges.txt "
                         f"in {path} or {os.path.join(path, 'tokenizer')}")


def load_tokenizer(path: str):
    """The CLIP tokenizer stored under `path` (a transformers `CLIPTokenizer`)."""
    from transformers import CLIPTokenizer

    folder = _tokenizer_dir(path)
    try:
        tok = CLIPTokenizer.from_pretrained(folder)
    except Exception as e:  # corrupt json, bad merges, ...
        raise TokenizerError(f"{folder}: cannot load the tokenizer: {type(e).__name__}: {e}") from e
    if tok.eos_token_id is None:
        raise TokenizerError(f"{folder}: the tokenizer has no end-of-text token")
    return tok


_BACKENDS: dict[int, tuple] = {}


def _backend(tokenizer):
    """A private copy of the tokenizer's Rust backend with padding/truncation off (thread-safe to
    share; ~10x faster per call than the transformers wrapper), or None if there is none."""
    entry = _BACKENDS.get(id(tokenizer))
    if entry is None or entry[0] is not tokenizer:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            from tokenizers import Tokenizer

            backend = Tokenizer.from_str(backend.to_str())
            backend.no_padding()
            backend.no_truncation()
        entry = _BACKENDS[id(tokenizer)] = (tokenizer, backend)
    return entry[1]


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    backend = _backend(tokenizer)
    if backend is None:
        return tokenizer(texts, padding=False, truncation=False)["input_ids"]
    return [e.ids for e in backend.encode_batch(texts, add_special_tokens=True)]


def tokenize(tokenizer, texts: str | Sequence[str], max_length: int = MAX_LENGTH) -> np.ndarray:
    """Token ids (N, max_length) int32: BOS, tokens, EOS, then pad tokens; over-long texts truncated."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    out = np.empty((len(texts), max_length), np.int32)
    if not texts:
        return out
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    encoded = _encode(tokenizer, texts)
    long = [i for i, ids in enumerate(encoded) if len(ids) > max_length]
    if long:
        log.warning("%d of %d texts are longer than %d tokens and were truncated (first: %r)",
                    len(long), len(texts), max_length, texts[long[0]][:80])
    out.fill(pad)
    for i, ids in enumerate(encoded):
        if len(ids) > max_length:
            ids = ids[:max_length - 1] + [eos]
        out[i, :len(ids)] = ids
    return out
