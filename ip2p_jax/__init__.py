"""ip2p_jax: InstructPix2Pix in JAX/Flax."""

__version__ = "0.1.0"
