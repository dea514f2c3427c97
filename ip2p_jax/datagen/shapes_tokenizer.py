"""A small CLIP tokenizer for the shapes world, saved in the Hugging Face format.

The vocabulary is CLIP's layout at a small scale: the 256 byte-level symbols, the same with the
end-of-word marker ``</w>``, then one BPE merge chain per word of the shapes world's captions
and instruction templates (so every such word is one token), then ``<|startoftext|>`` and
``<|endoftext|>``. Any other text still tokenizes (it falls back to byte symbols). The folder
holds ``vocab.json`` + ``merges.txt`` (what older hub folders have) and whatever transformers
writes with ``save_pretrained`` (``tokenizer.json`` + ``tokenizer_config.json`` in v5), so both
``ip2p_jax.tokenizer.load_tokenizer`` and ``transformers.CLIPTokenizer.from_pretrained``
read it.
"""
from __future__ import annotations

import json
import os
import re

from ip2p_jax.datagen.shapes.instructions import TEMPLATES
from ip2p_jax.datagen.shapes.world import COLORS, SHAPES, SIZES

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END = "</w>"


def byte_symbols() -> list[str]:
    """The GPT-2 / CLIP byte-to-unicode alphabet, in byte order (CLIP's first 256 vocab entries)."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, n = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + n))
            n += 1
    return out


def shapes_words() -> list[str]:
    """Every word of the shapes world's captions and instruction templates, sorted."""
    text = " ".join(t for ts in TEMPLATES.values() for t in ts)
    text = re.sub(r"\{\w+\}", " ", text)
    words = set(re.findall(r"[a-z]+", text.lower()))
    words |= set(COLORS) | set(SHAPES) | set(SIZES) | {"a", "an", "and", "on", "background"}
    return sorted(words)


def bpe_segments(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE of one lower-case word: repeatedly merge the lowest-ranked adjacent pair."""
    parts = list(word[:-1]) + [word[-1] + END]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b)), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        pairs = [(r, i) for r, i in pairs if r is not None]
        if not pairs:
            break
        _, i = min(pairs)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def vocab_and_merges(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """CLIP-style vocab (token -> id) and merges that make every word one token.

    Words are taken in turn: BPE with the merges so far splits the word into segments, and new
    merges (ranked after all earlier ones) join those segments left to right. A merge ranked
    last only fires when no earlier one applies, so it never changes an earlier word."""
    symbols = byte_symbols()
    tokens = symbols + [s + END for s in symbols]
    ranks: dict[tuple[str, str], int] = {}
    for w in words:
        parts = bpe_segments(w, ranks)
        cur = parts[0]
        for p in parts[1:]:
            ranks.setdefault((cur, p), len(ranks))
            cur += p
            tokens.append(cur)
    merges = [f"{a} {b}" for (a, b), _ in sorted(ranks.items(), key=lambda kv: kv[1])]
    vocab: dict[str, int] = {}
    for t in tokens + [BOS, EOS]:
        vocab.setdefault(t, len(vocab))
    return vocab, merges


def build_tokenizer(out_dir: str, words: list[str] | None = None):
    """Write the tokenizer folder ``out_dir`` and return the loaded CLIPTokenizer.

    Raises ValueError if a shapes word does not encode to a single token."""
    from transformers import CLIPTokenizer  # optional heavy dependency

    words = shapes_words() if words is None else sorted(set(words))
    vocab, merges = vocab_and_merges(words)
    os.makedirs(out_dir, exist_ok=True)
    vocab_path, merges_path = os.path.join(out_dir, "vocab.json"), os.path.join(out_dir, "merges.txt")
    with open(vocab_path, "w") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(merges_path, "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(vocab_path, merges_path, model_max_length=77, pad_token=EOS)
    tok.save_pretrained(out_dir)
    reloaded = CLIPTokenizer.from_pretrained(out_dir)
    split = [w for w in words if len(reloaded(w, add_special_tokens=False)["input_ids"]) != 1]
    if split:
        raise ValueError(f"{out_dir}: shapes words that are not one token: {split[:10]}")
    return reloaded


def vocab_size(tokenizer) -> int:
    return len(tokenizer)
