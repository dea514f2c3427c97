"""Evaluation metrics for edits (CLIP scores: ip2p_jax.metrics.clip_scores)."""
