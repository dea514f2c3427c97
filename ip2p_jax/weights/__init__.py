"""Reading and writing checkpoints (diffusers folders, single files, hub ids, our own)."""

from ip2p_jax.weights.naming import WeightsError, flax_to_torch, torch_to_flax  # noqa: F401
