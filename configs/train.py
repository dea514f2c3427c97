"""Training recipes for `ip2p train --config configs/train.py:PRESET --workdir DIR [--config.key=value ...]`.

Presets:
  sd15    the paper's recipe: init from Stable Diffusion 1.5 (conv_in widened to 8 channels),
          256^2, AdamW lr 1e-4 constant, effective batch 1024 (here: global batch 1024 = per-update
          examples; split into grad_accum micro-batches to fit memory), EMA 0.9999, conditioning
          dropout 0.05, 10k steps, checkpoint every 1000, sample edits every 2000.
            ip2p train --config configs/train.py:sd15 --workdir runs/ip2p \
              --config.model.init=/models/stable-diffusion-v1-5 --config.data.path=/data/tfds
  finetune  continue an InstructPix2Pix editor (8-channel UNet kept as it is; no 4->8 surgery; the
          EMA restarts from the loaded weights) on new triples, e.g. MagicBrush (built with
          scripts/build_tfds.py --format magicbrush): MagicBrush's finetune.yaml settings: lr 5e-5
          after 1000 warm-up steps, 256^2, flips, EMA 0.9999, conditioning dropout 0.05.
            ip2p train --config configs/train.py:finetune --workdir runs/magicbrush \
              --config.model.init=timbrooks/instruct-pix2pix --config.data.path=/data/tfds
  tiny    a small UNet from scratch on synthetic pairs; seconds on CPU (tokenizes with the demo
          model's shipped tokenizer; --config.model.tokenizer=DIR for another).
  shapes  a small UNet from scratch on the synthetic shapes dataset (TFDS, built by the datagen
          scripts) with SD 1.5's frozen VAE and text encoder; minutes on one accelerator.
  demo    the demo model's editor (ip2p_jax/demo_model): its UNet and CLIP text encoder, from scratch,
          trained jointly on a latent cache of VAE moments + token ids (the demo's encode stage).
          `python -m ip2p_jax.datagen.demo_model editor` fills in the workdir's tokenizer, cache and
          measured VAE scaling factor; by hand:
            ip2p train --config configs/train.py:demo --workdir RUN/editor \
              --config.model.tokenizer=RUN/tokenizer --config.data.path=RUN/latents
  lora    a LoRA of an InstructPix2Pix model (rank 16 on the UNet's attention projections; only the
          adapters train, the base stays frozen in bf16); the export is pytorch_lora_weights.safetensors:
            ip2p train --config configs/train.py:lora --workdir runs/lora \
              --config.model.init=timbrooks/instruct-pix2pix --config.data.path=/data/tfds
  lora_tiny  `tiny` as a rank-4 LoRA (UNet and text encoder); seconds on CPU.
  sdxl    diffusers' SDXL InstructPix2Pix recipe (train_instruct_pix2pix_sdxl.py, its SDXL-base example):
          init from SDXL base (conv_in widened to 8 channels) or an SDXL InstructPix2Pix folder, 512^2,
          AdamW lr 5e-5 constant, no warm-up, conditioning dropout 0.05 (text + pooled together), EMA,
          fp32 VAE, bf16 compute, both text encoders frozen, FSDP over 8 devices (params, EMA, AdamW).
            ip2p train --config configs/train.py:sdxl --workdir runs/sdxl \
              --config.model.init=/models/stable-diffusion-xl-base-1.0 --config.data.path=/data/tfds
  sdxl_tiny  a tiny SDXL layout (text_time UNet, two random text encoders) from scratch on synthetic
          pairs; seconds on CPU.
The autoencoder trains through the same loop: configs/autoencoder.py.
"""
from __future__ import annotations

import os

import ml_collections

from ip2p_jax.demo import DEMO_MODEL_DIR
from ip2p_jax.datagen import demo_model

SD15_SCHEDULER_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012)


def tiny_unet() -> dict:
    """One resolution level, cross-attention in the mid block: compiles in seconds on CPU."""
    return dict(sample_size=16, in_channels=8, out_channels=4, layers_per_block=1, block_out_channels=(16,),
                norm_num_groups=4, cross_attention_dim=16, attention_head_dim=2,
                down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",))


def tiny_vae() -> dict:
    """One level (no downsampling: latents have the image's size)."""
    return dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), layers_per_block=1,
                norm_num_groups=4, sample_size=16, down_block_types=("DownEncoderBlock2D",),
                up_block_types=("UpDecoderBlock2D",))


def tiny_text_encoder() -> dict:
    return dict(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu")


def tiny_sdxl_unet() -> dict:
    """SDXL's layout in miniature: no attention at the first level, linear projections, 2 transformer
    layers at the second, text_time micro-conditioning (pooled 16 + 6 time ids x 8)."""
    return dict(tiny_unet(), block_out_channels=(16, 32), attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
                cross_attention_dim=16 + 24, use_linear_projection=True,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), addition_embed_type="text_time",
                addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16)


def tiny_sdxl_text_encoder_2() -> dict:
    """transformers CLIPTextConfig of a CLIPTextModelWithProjection (SDXL's OpenCLIP bigG, in miniature)."""
    return dict(tiny_text_encoder(), hidden_size=24, intermediate_size=48, hidden_act="gelu", projection_dim=16)


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "editor"         # the training loop's task: editor (InstructPix2Pix) | autoencoder
    c.seed = 0

    c.model = m = ml_collections.ConfigDict()
    m.init = ""               # SD (4-ch) or InstructPix2Pix (8-ch) model: folder, single file or hub id; "" = scratch
    m.init_must_be_editor = False  # refuse an init whose UNet is not already an 8-channel editor (finetune)
    m.frozen_from = ""        # VAE / text encoder / tokenizer / scheduler source when init == ""
    m.tokenizer = ""          # tokenizer folder when both are "" (random VAE / text encoder from the dicts below)
    m.unet = tiny_unet()      # diffusers UNet config (scratch only)
    m.vae = tiny_vae()        # diffusers AutoencoderKL config (scratch, no frozen_from)
    m.text_encoder = tiny_text_encoder()  # transformers CLIPTextConfig (scratch, no frozen_from)
    m.text_encoder_2 = {}     # SDXL from scratch: the second encoder's CLIPTextConfig ({} = an SD model)
    m.tokenizer_2 = ""        # SDXL from scratch: its tokenizer folder ("" = model.tokenizer)
    m.vae_dtype = ""          # "" = compute_dtype; fp32 for the stock SDXL VAE (overflows in fp16)
    m.prediction_type = ""    # "" = the scheduler config's (epsilon for SD 1.x); or epsilon / v_prediction
    m.compute_dtype = "bfloat16"   # float32 | bfloat16 | float16 (or fp32 / bf16 / fp16; "" = bf16 on GPU/TPU)
    m.attention_impl = "auto"
    m.remat = "none"          # what UNet blocks keep for the backward pass: none | dots (matmul outputs) | full
    m.train_text_encoder = False

    c.optim = o = ml_collections.ConfigDict()
    o.learning_rate = 1e-4
    o.warmup_steps = 0
    o.decay_start = 0         # with decay_steps > 0: linear cool-down to 0 from this step
    o.decay_steps = 0
    o.weight_decay = 1e-2
    o.b1, o.b2, o.eps = 0.9, 0.999, 1e-8
    o.max_grad_norm = 1.0     # 0 = no clipping

    c.train = t = ml_collections.ConfigDict()
    t.batch_size = 64         # global examples per update (all hosts, all micro-batches)
    t.grad_accum = 1          # micro-batches per update
    t.num_steps = 1000
    t.ema_decay = 0.9999
    t.cond_dropout_prob = 0.05
    t.max_nonfinite_steps = 10  # stop after this many skipped (non-finite) steps in a row

    c.parallel = p = ml_collections.ConfigDict()
    p.mode = "pmap"           # pmap (data parallel) | jit (('data','fsdp') mesh)
    p.mesh_data = -1          # -1 = all devices / fsdp
    p.fsdp = 1
    p.fsdp_min_size = 2 ** 14

    c.data = d = ml_collections.ConfigDict()
    d.source = "synthetic"    # synthetic | tfds | latent_cache
    d.path = ""               # tfds: data_dir (or dataset folder); latent_cache: the cache folder
    d.name = ""               # tfds dataset name (when path is a data_dir)
    d.split = "train"
    d.resolution = 256
    d.min_resize = 256
    d.max_resize = 256
    d.flip = True
    d.workers = -1            # grain worker processes for tfds: -1 = one per 4 host cores, at most 8
    d.image_dtype = "uint8"   # batch images on the wire: uint8 (scaled on the device) | float32
    d.num_examples = 0        # synthetic: repeat this many pairs (0 = endless distinct pairs)
    d.validation_split = "validation"

    c.lora = r = ml_collections.ConfigDict()
    r.rank = 0                # 0: train the full UNet; > 0: a LoRA of this rank (only the adapters train)
    r.alpha = 0.0             # the update is scaled by alpha / rank; 0 = rank (scale 1)
    r.dropout = 0.0           # drops the adapters' input features (one mask per layer per step)
    r.targets = ("to_q", "to_k", "to_v", "to_out.0")   # UNet layers (name suffixes, PyTorch or our spelling)
    r.text_encoder = False    # also adapt the text encoder (instead of model.train_text_encoder)
    r.text_targets = ("q_proj", "k_proj", "v_proj", "out_proj")
    r.convs = False           # let targets match conv layers too (e.g. "conv1", "proj_in")

    c.checkpoint = k = ml_collections.ConfigDict()
    k.every_steps = 1000
    k.keep = 3
    k.async_save = True
    k.keep_steps = ()         # steps kept besides the last `keep` (e.g. the constant-rate state at decay_start)

    c.log = g = ml_collections.ConfigDict()
    g.every_steps = 50
    g.tensorboard = True      # event files in <workdir>/tensorboard (metrics.jsonl is always written)
    g.sample_every_steps = 2000  # 0 = no sample edits
    g.num_samples = 4
    g.sample_steps = 20
    g.text_guidance = 7.5
    g.image_guidance = 1.5
    g.progress_bar = False    # a tqdm bar (the log line every every_steps is always written)

    c.export = e = ml_collections.ConfigDict()
    e.at_end = True
    e.dir = ""                # "" = <workdir>/export
    return c


def sd15(c: ml_collections.ConfigDict) -> None:
    c.model.init = "runwayml/stable-diffusion-v1-5"
    c.model.remat = "full"    # fits 16 GB chips; "dots" is faster where memory allows (e.g. an H200 at 256^2)
    c.train.batch_size = 1024
    c.train.grad_accum = 4
    c.train.num_steps = 10_000
    c.data.source = "tfds"
    c.data.name = "edit_pairs"
    c.checkpoint.every_steps = 1000
    c.log.sample_every_steps = 2000


def finetune(c: ml_collections.ConfigDict) -> None:
    """Fine-tune a released editor (MagicBrush's recipe, its finetune.yaml: base lr 5e-5, LambdaLinear
    warm-up over 1000 steps, batch 16 per GPU, 256^2 crops, flip 0.5, EMA loaded and kept)."""
    c.model.init = "timbrooks/instruct-pix2pix"
    c.model.init_must_be_editor = True
    c.model.remat = "full"
    c.optim.learning_rate = 5e-5
    c.optim.warmup_steps = 1000
    c.train.batch_size = 32
    c.train.num_steps = 5_000
    c.data.source = "tfds"
    c.data.name = "magicbrush"
    c.checkpoint.every_steps = 500
    c.log.sample_every_steps = 1000


def tiny(c: ml_collections.ConfigDict) -> None:
    c.model.tokenizer = os.path.join(DEMO_MODEL_DIR, "tokenizer")   # shipped with the package
    c.model.compute_dtype = "float32"
    c.model.train_text_encoder = True
    c.optim.learning_rate = 3e-3
    c.train.batch_size = 8
    c.train.num_steps = 20
    c.train.ema_decay = 0.99
    c.data.resolution = c.data.min_resize = c.data.max_resize = 16
    c.data.num_examples = 8
    c.checkpoint.every_steps = 10
    c.log.every_steps = 5
    c.log.sample_every_steps = 0
    c.log.num_samples = 2
    c.log.sample_steps = 4


def shapes(c: ml_collections.ConfigDict) -> None:
    """A small UNet from scratch; SD 1.5's VAE and (frozen) text encoder."""
    c.model.frozen_from = "runwayml/stable-diffusion-v1-5"
    c.model.unet = dict(tiny_unet(), block_out_channels=(64, 128, 256), layers_per_block=2, norm_num_groups=32,
                        cross_attention_dim=768, attention_head_dim=8,
                        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    c.optim.learning_rate = 3e-4
    c.optim.warmup_steps = 500
    c.train.batch_size = 256
    c.train.num_steps = 20_000
    c.data.source = "tfds"
    c.data.name = "shapes"
    c.data.resolution = c.data.min_resize = c.data.max_resize = 64
    c.checkpoint.every_steps = 1000
    c.log.sample_every_steps = 1000


def demo(c: ml_collections.ConfigDict) -> None:
    """The demo model's editor: UNet + text encoder from scratch, jointly, on a latent cache."""
    c.model.unet = dict(demo_model.UNET_CONFIG)
    c.model.vae = dict(demo_model.VAE_CONFIG)
    c.model.text_encoder = dict(demo_model.TEXT_CONFIG, vocab_size=706, bos_token_id=704, eos_token_id=705,
                                pad_token_id=705)   # the shapes tokenizer's (the editor stage reads the workdir's)
    c.model.compute_dtype = "float32"
    c.model.train_text_encoder = True
    c.optim.learning_rate = 8e-4
    c.optim.warmup_steps = 200
    c.train.batch_size = 64
    c.train.num_steps = 20_000
    c.train.ema_decay = 0.999
    c.parallel.mode = "jit"
    c.data.source = "latent_cache"
    c.data.resolution = c.data.min_resize = c.data.max_resize = demo_model.RESOLUTION
    c.checkpoint.every_steps = 250
    c.checkpoint.keep = 2
    c.log.tensorboard = False
    c.log.sample_every_steps = 0
    c.export.at_end = False   # the demo's assemble stage writes the model (with the workdir's VAE)


def lora(c: ml_collections.ConfigDict) -> None:
    """A LoRA of an InstructPix2Pix model on new pairs (diffusers' LoRA scripts' settings: rank 16, lr 1e-4)."""
    c.model.init = "timbrooks/instruct-pix2pix"
    c.lora.rank = 16
    c.lora.alpha = 16.0
    c.optim.learning_rate = 1e-4
    c.optim.weight_decay = 1e-2
    c.train.batch_size = 32
    c.train.num_steps = 5000
    c.train.ema_decay = 0.999
    c.data.source = "tfds"
    c.data.name = "edit_pairs"
    c.checkpoint.every_steps = 500
    c.log.sample_every_steps = 500


def lora_tiny(c: ml_collections.ConfigDict) -> None:
    tiny(c)
    c.model.train_text_encoder = False
    c.lora.rank = 4
    c.lora.alpha = 4.0
    c.lora.targets = ("to_q", "to_k", "to_v", "to_out.0")
    c.lora.text_encoder = True
    c.optim.learning_rate = 1e-2


def sdxl(c: ml_collections.ConfigDict) -> None:
    """diffusers' SDXL InstructPix2Pix example (SDXL base, 512^2, lr 5e-5, no warm-up, dropout 0.05, EMA),
    with the global batch of its 8-GPU run (4 per GPU x 4 accumulation x 8)."""
    c.model.init = "stabilityai/stable-diffusion-xl-base-1.0"
    c.model.vae_dtype = "float32"       # --vae_precision fp32, the script's default
    c.model.remat = "full"
    c.optim.learning_rate = 5e-5
    c.train.batch_size = 128
    c.train.grad_accum = 4
    c.train.num_steps = 15_000
    c.parallel.mode = "jit"
    c.parallel.fsdp = 8                 # params, EMA and AdamW state sharded over 8 devices (~5 GiB each)
    c.data.source = "tfds"
    c.data.name = "edit_pairs"
    c.data.resolution = c.data.min_resize = c.data.max_resize = 512
    c.checkpoint.every_steps = 1000
    c.log.sample_every_steps = 2000


def sdxl_tiny(c: ml_collections.ConfigDict) -> None:
    """The tiny preset with a tiny SDXL model (text_time UNet, two random frozen text encoders)."""
    tiny(c)
    c.model.unet = tiny_sdxl_unet()
    c.model.text_encoder_2 = tiny_sdxl_text_encoder_2()
    c.model.train_text_encoder = False
    c.model.vae_dtype = "float32"


PRESETS = {"sd15": sd15, "finetune": finetune, "tiny": tiny, "shapes": shapes, "demo": demo, "lora": lora,
           "lora_tiny": lora_tiny, "sdxl": sdxl, "sdxl_tiny": sdxl_tiny}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    arg = arg or "tiny"
    if arg not in PRESETS:
        raise ValueError(f"configs/train.py: unknown preset {arg!r}; choose one of {sorted(PRESETS)}")
    c = base()
    PRESETS[arg](c)
    c.preset = arg
    return c
