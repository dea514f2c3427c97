"""MagicBrush's edit metrics, per turn: L1, L2, CLIP-I and CLIP-T against the annotated target.

    per_turn = turn_scores(scorer, edited, targets, texts)   # ClipScorer of ip2p_jax.metrics.clip_scores
    summarize(per_turn, sessions, turns)    # {"all_turns": ..., "final_turn": ..., "by_turn": {1: ..., 2: ...}}

As MagicBrush's evaluation/image_eval.py:
  l1, l2   mean |e - t| and mean (e - t)^2 over pixels and channels, RGB in [0, 1] (x / 255), the
           edited image first resized to the target's size (PIL bicubic);
  clip_i   cos(image(edited), image(target));
  clip_t   cos(image(edited), text(caption of the target)) (the script falls back to the
           instruction where no caption is known, and says so).
CLIP features are the scorer's (transformers' CLIPImageProcessor preprocessing), not the OpenAI
`clip` package's, so CLIP numbers are comparable between our runs, not digit for digit with papers.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from ip2p_jax.metrics.clip_scores import cosine, to_rgb_uint8

METRICS = ("l1", "l2", "clip_i", "clip_t")


def pixel_distances(edited, target, *, name: str = "edited image") -> tuple[float, float]:
    """(L1, L2) of one edit against its target (PIL images or uint8 arrays; alpha composited on white)."""
    t = to_rgb_uint8(target, name=f"{name}'s target")
    e = to_rgb_uint8(edited, name=name)
    if e.shape != t.shape:
        e = np.asarray(Image.fromarray(e).resize((t.shape[1], t.shape[0]), resample=Image.BICUBIC))
    d = e.astype(np.float64) / 255.0 - t.astype(np.float64) / 255.0
    return float(np.mean(np.abs(d))), float(np.mean(d * d))


def turn_scores(scorer, edited: Sequence, targets: Sequence, texts: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-turn l1, l2, clip_i, clip_t (float64 arrays of length N) for N edits, their targets and
    the texts CLIP-T compares with."""
    edited, targets, texts = list(edited), list(targets), list(texts)
    if not len(edited) == len(targets) == len(texts):
        raise ValueError(f"turn_scores needs as many of each: got {len(edited)} edited images, {len(targets)} "
                         f"targets, {len(texts)} texts")
    dist = np.array([pixel_distances(e, t, name=f"edited image {i}") for i, (e, t) in
                     enumerate(zip(edited, targets))], np.float64).reshape(-1, 2)
    f_edit = scorer.image_features(edited, names=[f"edited image {i}" for i in range(len(edited))])
    f_target = scorer.image_features(targets, names=[f"target image {i}" for i in range(len(targets))])
    f_text = scorer.text_features(texts)
    return {"l1": dist[:, 0], "l2": dist[:, 1], "clip_i": cosine(f_edit, f_target),
            "clip_t": cosine(f_edit, f_text)}


def _means(scores: dict, rows) -> dict:
    out = {m: float(np.mean(np.asarray(scores[m], np.float64)[rows])) for m in METRICS if m in scores}
    out["num"] = int(len(rows))
    return out


def summarize(scores: dict, sessions: Sequence[str], turns: Sequence[int]) -> dict:
    """Means of each metric over all turns, over each session's last turn ("final_turn"), and per
    turn index ("by_turn", keys as strings "1", "2", ...)."""
    sessions, turns = list(sessions), [int(t) for t in turns]
    n = len(turns)
    if n == 0 or len(sessions) != n:
        raise ValueError(f"summarize needs one session and turn per score: {len(sessions)} sessions, {n} turns")
    last: dict[str, int] = {}
    for i, (s, t) in enumerate(zip(sessions, turns)):
        if s not in last or t > turns[last[s]]:
            last[s] = i
    by_turn = {str(t): _means(scores, np.flatnonzero(np.asarray(turns) == t)) for t in sorted(set(turns))}
    return {"all_turns": _means(scores, np.arange(n)), "final_turn": _means(scores, np.array(sorted(last.values()))),
            "by_turn": by_turn}
