"""Training: state.py (train state, AdamW, EMA), dropout.py (conditioning dropout), step.py (the one train
step), parallel.py (pmap / jit-on-a-mesh runners), build.py (models and initial params from a config),
data.py, synthetic.py, latent_cache.py (input streams), checkpoint.py (orbax), loop.py (the loop),
export.py (EMA weights -> diffusers folder), configs.py (config files and --config.key=value overrides).
See docs/training.md."""
