"""Flax modules (Linen). Param paths mirror the PyTorch module names; see ip2p_jax.weights.naming."""
