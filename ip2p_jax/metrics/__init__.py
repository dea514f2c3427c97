"""Evaluation metrics for edits (CLIP scores: ip2p_jax.metrics.clip_scores; MagicBrush's L1, L2,
CLIP-I, CLIP-T per turn: ip2p_jax.metrics.magicbrush)."""
