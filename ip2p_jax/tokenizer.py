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
from tokenizers import Tokenizer

from ip2p_jax.errors import Ip2pError

log = logging.getLogger(__name__)

MAX_LENGTH = 77


class TokenizerError(Ip2pError):
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
    from transformers import CLIPTokenizer  # optional heavy dependency (slow import; workers skip it)

    folder = _tokenizer_dir(path)
    try:
        tok = CLIPTokenizer.from_pretrained(folder)
    except Exception as e:  # corrupt json, bad merges, ...
        raise TokenizerError(f"{folder}: cannot load the tokenizer: {type(e).__name__}: {e}") from e
    if tok.eos_token_id is None:
        raise TokenizerError(f"{folder}: the tokenizer has no end-of-text token")
    return tok


class FastTokenizer:
    """What `tokenize` needs from a tokenizer: its Rust backend (padding and truncation off) and
    the pad / end-of-text ids. Thread-safe, cheap to pickle into worker processes (no
    transformers import there), ~10x faster per call than the transformers wrapper."""

    def __init__(self, backend_json: str, pad_token_id: int, eos_token_id: int):
        self._json, self.pad_token_id, self.eos_token_id = backend_json, pad_token_id, eos_token_id
        self._backend = Tokenizer.from_str(backend_json)
        self._backend.no_padding()
        self._backend.no_truncation()

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=True)]

    def __reduce__(self):
        return FastTokenizer, (self._json, self.pad_token_id, self.eos_token_id)


_FAST: dict[int, tuple] = {}


def fast_tokenizer(tokenizer) -> FastTokenizer | None:
    """The FastTokenizer of a transformers tokenizer (cached), or None if it has no Rust backend."""
    if isinstance(tokenizer, FastTokenizer):
        return tokenizer
    entry = _FAST.get(id(tokenizer))
    if entry is None or entry[0] is not tokenizer:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        fast = None
        if backend is not None:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            fast = FastTokenizer(backend.to_str(), pad, tokenizer.eos_token_id)
        entry = _FAST[id(tokenizer)] = (tokenizer, fast)
    return entry[1]


def tokenize(tokenizer, texts: str | Sequence[str], max_length: int = MAX_LENGTH) -> np.ndarray:
    """Token ids (N, max_length) int32: BOS, tokens, EOS, then pad tokens; over-long texts truncated.

    `tokenizer`: a transformers tokenizer (as from `load_tokenizer`) or a FastTokenizer."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    out = np.empty((len(texts), max_length), np.int32)
    if not texts:
        return out
    fast = fast_tokenizer(tokenizer)
    if fast is not None:
        pad, eos, encoded = fast.pad_token_id, fast.eos_token_id, fast.encode(texts)
    else:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = tokenizer.eos_token_id
        encoded = tokenizer(texts, padding=False, truncation=False)["input_ids"]
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
