"""Training: task.py (what a run trains), editor.py (the InstructPix2Pix task), autoencoder.py (the KL
autoencoder task), loop.py (the one loop), state.py (train state, AdamW, EMA), dropout.py (conditioning
dropout), step.py (the one update step), parallel.py (pmap / jit-on-a-mesh runners), build.py (models
and initial params from a config), data.py, synthetic.py, scene_crops.py (input streams; the latent
cache reader is ip2p_jax/data/latent_cache.py), latent_cache.py (writes caches), checkpoint.py (orbax),
export.py (EMA weights -> diffusers folder), configs.py (config files and --config.key=value overrides).
See docs/training.md."""
