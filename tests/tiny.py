"""Tiny random models in the references' own classes, for parity tests (no network).

Weights are perturbed so that zero-initialised output layers cannot hide errors.
"""
from __future__ import annotations

import json
import os

import numpy as np

WORDS = ["make", "it", "winter", "a", "the", "red", "blue", "green", "circle", "square", "turn",
         "into", "add", "remove", "photo", "of", "dog", "cat", "sky", "background"]


def _byte_symbols():
    """GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest to chr(256 + n)."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    n = 0
    for b in range(256):
        if b in keep:
            yield chr(b)
        else:
            yield chr(256 + n)
            n += 1


def tokenizer_files(directory: str) -> tuple[str, str]:
    """Write a small byte-level BPE vocab.json + merges.txt that the CLIP tokenizer accepts."""
    os.makedirs(directory, exist_ok=True)
    symbols = list(_byte_symbols())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges = []
    for w in WORDS:  # merge each word left to right: w[0]w[1], (w[0]w[1])w[2], ...
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        cur = pieces[0]
        for p in pieces[1:]:
            merges.append(f"{cur} {p}")
            cur = cur + p
            vocab_list.append(cur)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab, seen = {}, set()
    for tok in vocab_list:
        if tok not in seen:
            seen.add(tok)
            vocab[tok] = len(vocab)
    merges = list(dict.fromkeys(merges))
    vpath, mpath = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
    with open(vpath, "w") as f:
        json.dump(vocab, f)
    with open(mpath, "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vpath, mpath


def tokenizer(directory: str):
    from transformers import CLIPTokenizer

    vpath, mpath = tokenizer_files(directory)
    return CLIPTokenizer(vpath, mpath, model_max_length=77)


def perturb(module, scale: float = 0.05, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module.eval()


def unet(in_channels: int = 8, sd2: bool = False, seed: int = 0):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    kw = dict(
        sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    if sd2:
        kw.update(attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True)
    else:
        kw.update(attention_head_dim=8)
    return perturb(UNet2DConditionModel(**kw), seed=seed)


def vae(seed: int = 0):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    m = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                      layers_per_block=1, norm_num_groups=8, sample_size=32)
    return perturb(m, seed=seed)


def text_encoder(vocab_size: int, seed: int = 0, hidden_act: str = "quick_gelu"):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, hidden_act=hidden_act,
                         bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    return perturb(CLIPTextModel(cfg), seed=seed)


def save_pipeline(directory: str, seed: int = 0, scheduler: str = "euler_a") -> str:
    """A complete tiny InstructPix2Pix pipeline in diffusers' folder layout; returns `directory`."""
    from diffusers import (DDIMScheduler, EulerAncestralDiscreteScheduler,
                           StableDiffusionInstructPix2PixPipeline)

    import tempfile

    tok = tokenizer(tempfile.mkdtemp(prefix="tok_"))
    sched_kw = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    sched = (DDIMScheduler(**sched_kw, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
             if scheduler == "ddim" else EulerAncestralDiscreteScheduler(**sched_kw))
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=vae(seed), text_encoder=text_encoder(len(tok), seed), tokenizer=tok, unet=unet(8, seed=seed),
        scheduler=sched, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(directory)
    return directory


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth-ish uint8 RGB test image (gradients + noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([yy, xx, 1 - yy], -1)
    return np.clip(255 * (0.8 * base + 0.2 * rng.random((h, w, 3))), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- SDXL

SDXL_TIME_DIM, SDXL_PROJECTION = 8, 16   # addition_time_embed_dim; text_encoder_2 projection_dim


def sdxl_unet(in_channels: int = 8, seed: int = 0, text_dims: tuple[int, int] = (32, 48)):
    """SDXL's UNet layout in miniature: no attention at the first level, linear projections,
    2 transformer layers at the second (and in the middle), text_time micro-conditioning."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    m = UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        norm_num_groups=8, cross_attention_dim=sum(text_dims), attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2), use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_DIM,
        projection_class_embeddings_input_dim=6 * SDXL_TIME_DIM + SDXL_PROJECTION)
    return perturb(m, seed=seed)


def text_encoder_2(vocab_size: int, seed: int = 0, layers: int = 2, hidden: int = 48):
    """transformers CLIPTextModelWithProjection (SDXL's OpenCLIP bigG encoder), gelu, pad id 0. Its
    hidden size differs from text_encoder's, as in SDXL (diffusers' single-file reader tells the
    two encoders apart by it)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
                         projection_dim=SDXL_PROJECTION, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                         pad_token_id=0)
    return perturb(CLIPTextModelWithProjection(cfg), seed=seed)


def tokenizer_2(directory: str):
    """SDXL's second tokenizer: the same BPE, padded with "!" (id 0) instead of the end token."""
    from transformers import CLIPTokenizer

    vpath, mpath = tokenizer_files(directory)
    return CLIPTokenizer(vpath, mpath, model_max_length=77, pad_token="!")


def save_sdxl_pipeline(directory: str, seed: int = 0, scheduler: str = "euler", *,
                       force_zeros_for_empty_prompt: bool = True) -> str:
    """A complete tiny SDXL InstructPix2Pix pipeline in diffusers' folder layout; returns `directory`."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionXLInstructPix2PixPipeline

    import tempfile

    tok = tokenizer(tempfile.mkdtemp(prefix="tok_"))
    tok2 = tokenizer_2(tempfile.mkdtemp(prefix="tok2_"))
    sched_kw = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    sched = (DDIMScheduler(**sched_kw, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
             if scheduler == "ddim" else EulerDiscreteScheduler(**sched_kw))
    pipe = StableDiffusionXLInstructPix2PixPipeline(
        vae=vae(seed), text_encoder=text_encoder(len(tok), seed), text_encoder_2=text_encoder_2(len(tok2), seed + 1),
        tokenizer=tok, tokenizer_2=tok2, unet=sdxl_unet(8, seed=seed), scheduler=sched,
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, add_watermarker=False)
    pipe.save_pretrained(directory)
    return directory
