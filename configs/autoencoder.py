"""Autoencoder recipes for `ip2p train --config configs/autoencoder.py:PRESET --workdir DIR [--config.key=value ...]`.

The KL autoencoder (ip2p_jax/train/autoencoder.py) through the one training loop (orbax
checkpoints, resume, SIGTERM save, metrics); the export is `<export.dir>/vae_params.msgpack`.

Presets:
  demo     the demo model's VAE (f=4, 4 latent channels) from scratch on 32x32 crops of 64x64
           renders of random shapes-world scenes (the demo's `vae` stage).
  decoder  fine-tune the decoder of trained params with the encoder frozen (the demo's `decoder`
           stage): --config.model.init_params=RUN/vae_params.msgpack.
"""
from __future__ import annotations

import ml_collections

from ip2p_jax.datagen import demo_model


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "autoencoder"
    c.seed = 0

    c.model = m = ml_collections.ConfigDict()
    m.vae = dict(demo_model.VAE_CONFIG)   # diffusers AutoencoderKL config
    m.init_params = ""        # a vae_params.msgpack to start from ("" = random init)
    m.decoder_only = False    # freeze encoder + quant_conv (needs init_params): latents stay valid

    c.loss = lo = ml_collections.ConfigDict()
    lo.kl_weight = 1e-5
    lo.l1_weight = 1.0
    lo.mse_weight = 1.0

    c.optim = o = ml_collections.ConfigDict()
    o.learning_rate = 1e-3
    o.warmup_steps = 100
    o.decay_start = 0         # with decay_steps > 0: linear cool-down to 0 from this step
    o.decay_steps = 0
    o.weight_decay = 0.0
    o.b1, o.b2, o.eps = 0.9, 0.999, 1e-8
    o.max_grad_norm = 1.0

    c.train = t = ml_collections.ConfigDict()
    t.batch_size = 32
    t.grad_accum = 1
    t.num_steps = 800
    t.ema_decay = 0.999       # kept in the state; the export is the trained params
    t.max_nonfinite_steps = 10

    c.parallel = p = ml_collections.ConfigDict()
    p.mode = "jit"
    p.mesh_data = -1
    p.fsdp = 1
    p.fsdp_min_size = 2 ** 14

    c.data = d = ml_collections.ConfigDict()
    d.source = "shapes_scenes"
    d.crop = 32               # training crops of the 64x64 renders
    d.pool = 0                # renders kept (0 = max(64, 16 x batch_size)), partly re-rendered as it goes
    d.refresh = 64

    c.checkpoint = k = ml_collections.ConfigDict()
    k.every_steps = 200
    k.keep = 2
    k.async_save = True
    k.keep_steps = ()

    c.log = g = ml_collections.ConfigDict()
    g.every_steps = 50
    g.tensorboard = False
    g.sample_every_steps = 0
    g.progress_bar = False

    c.export = e = ml_collections.ConfigDict()
    e.at_end = True
    e.dir = ""                # "" = <workdir>/export
    return c


def demo(c: ml_collections.ConfigDict) -> None:
    pass


def decoder(c: ml_collections.ConfigDict) -> None:
    c.seed = 1
    c.model.decoder_only = True
    c.optim.learning_rate = 5e-4
    c.train.num_steps = 5000
    c.optim.decay_steps = 2000
    c.optim.decay_start = 3000   # the last decay_steps steps


PRESETS = {"demo": demo, "decoder": decoder}


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    arg = arg or "demo"
    if arg not in PRESETS:
        raise ValueError(f"configs/autoencoder.py: unknown preset {arg!r}; choose one of {sorted(PRESETS)}")
    c = base()
    PRESETS[arg](c)
    c.preset = arg
    return c
