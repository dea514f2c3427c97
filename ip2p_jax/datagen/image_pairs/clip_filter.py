"""The authors' CLIP filter: which sampled pairs of a prompt are kept, in which order.

A pair passes when (all `>=`, as the authors' generate_img_dataset.py compares)
    clip_sim_0 >= image_caption and clip_sim_1 >= image_caption   (each image vs its caption)
    clip_sim_dir >= direction                                      (image change vs caption change)
    clip_sim_image >= image_image                                  (input vs edited image)
and at most `keep` passing pairs are kept, by descending (clip_sim_dir, seed).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from ip2p_jax.metrics.clip_scores import scores_from_features

# the authors' metadata.jsonl names of ip2p_jax.metrics.clip_scores' metrics
METADATA_KEYS = {"sim_0": "clip_sim_0", "sim_1": "clip_sim_1", "sim_direction": "clip_sim_dir",
                 "sim_image": "clip_sim_image"}


@dataclasses.dataclass(frozen=True)
class ClipFilter:
    image_caption: float = 0.2
    direction: float = 0.2
    image_image: float = 0.7

    def passes(self, m: Mapping[str, float]) -> bool:
        return (m["clip_sim_image"] >= self.image_image and m["clip_sim_dir"] >= self.direction
                and m["clip_sim_0"] >= self.image_caption and m["clip_sim_1"] >= self.image_caption)


def select(results: Mapping[int, Mapping[str, float]], clip_filter: ClipFilter | None, keep: int) -> list[int]:
    """Seeds to keep from {seed: metadata}. With a filter: those that pass, best direction first
    (ties: larger seed first, as the authors' sort of (sim_dir, seed) tuples). Without one (no
    CLIP model): the first `keep` seeds in the order given."""
    if clip_filter is None:
        return list(results)[:keep]
    passing = [(m["clip_sim_dir"], seed) for seed, m in results.items() if clip_filter.passes(m)]
    return [seed for _, seed in sorted(passing, reverse=True)[:keep]]


def pair_scores(scorer, images_0: Sequence, images_1: Sequence, text_features: np.ndarray) -> list[dict]:
    """CLIP metrics of pairs of one prompt: images as uint8 arrays / PIL, text_features (2, D) of
    [input caption, edited caption] (ClipScorer.text_features). Returns one metadata dict per pair."""
    n = len(images_0)
    feats = scorer.image_features(list(images_0) + list(images_1))
    t0, t1 = (np.repeat(text_features[k:k + 1], n, axis=0) for k in (0, 1))
    scores = scores_from_features(feats[:n], feats[n:], t0, t1)
    return [{METADATA_KEYS[k]: float(scores[k][j]) for k in METADATA_KEYS} for j in range(n)]
