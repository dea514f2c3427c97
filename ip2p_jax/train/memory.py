"""Bytes per device of a training run on a ('data', 'fsdp') mesh, from shapes alone.

Nothing is allocated: the UNet's params come from `jax.eval_shape` (models.unet.abstract_params),
the train state (params, EMA, the flat AdamW state) from train.state.abstract_train_state, and
each array's per-device share from the same `fsdp_spec` rule MeshRunner shards with. So the
numbers for the full-size SDXL InstructPix2Pix UNet need no SDXL weights:

    rows = sdxl_memory_report(fsdp_sizes=(1, 4, 8))
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import jax
import numpy as np

from ip2p_jax.models import clip, unet, vae
from ip2p_jax.train.parallel import fsdp_spec
from ip2p_jax.train.state import OptimizerConfig, abstract_train_state, make_optimizer

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json with 8 input channels (InstructPix2Pix)
SDXL_IP2P_UNET = {
    "sample_size": 128, "in_channels": 8, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280], "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True, "norm_num_groups": 32,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
# The frozen networks of SDXL: its VAE, CLIP ViT-L and OpenCLIP ViT-bigG (text_encoder_2)
SDXL_VAE = {"block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 2, "latent_channels": 4,
            "sample_size": 1024, "scaling_factor": 0.13025}
SDXL_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
             "projection_dim": 768, "hidden_act": "quick_gelu"}
SDXL_TEXT_2 = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
               "projection_dim": 1280, "hidden_act": "gelu"}


def per_device_bytes(tree: Any, fsdp: int, min_size: int = 2 ** 14) -> int:
    """Bytes one device holds of `tree` (arrays or ShapeDtypeStructs) when each leaf is sharded by
    fsdp_spec over an fsdp-sized axis (replicated when it is too small or nothing divides)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = tuple(leaf.shape)
        spec = fsdp_spec(shape, fsdp, min_size)
        shards = fsdp if any(s is not None for s in spec) else 1
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize // shards
    return total


def train_state_bytes(abstract_params: Any, fsdp: int, *, optimizer: OptimizerConfig | None = None,
                      min_size: int = 2 ** 14) -> dict[str, int]:
    """{"params", "ema", "optimizer", "total"}: per-device bytes of a fp32 train state of these params."""
    state = abstract_train_state(abstract_params, make_optimizer(optimizer or OptimizerConfig()))
    parts = {"params": state.params, "ema": state.ema_params, "optimizer": state.opt_state}
    out = {name: per_device_bytes(tree, fsdp, min_size) for name, tree in parts.items()}
    out["total"] = sum(out.values())
    return out


def sdxl_abstract_params() -> dict:
    """Shapes of the full-size SDXL InstructPix2Pix networks: {"unet", "vae", "text_encoder", "text_encoder_2"}."""
    return {
        "unet": unet.abstract_params(unet.UNetConfig.from_dict(SDXL_IP2P_UNET)),
        "vae": vae.abstract_params(vae.VAEConfig.from_dict(SDXL_VAE)),
        "text_encoder": clip.abstract_params(clip.CLIPTextConfig.from_dict(SDXL_TEXT)),
        "text_encoder_2": clip.abstract_params(clip.CLIPTextConfig.from_dict(SDXL_TEXT_2), projection=True),
    }


def sdxl_memory_report(fsdp_sizes: Iterable[int] = (1, 4, 8), *, min_size: int = 2 ** 14) -> list[dict]:
    """One row per fsdp size: per-device bytes of the trained UNet's state (fp32 params, EMA and
    AdamW moments) and of the frozen fp32 VAE and text encoders, sharded as MeshRunner does."""
    shapes = sdxl_abstract_params()
    frozen = {k: v for k, v in shapes.items() if k != "unet"}
    rows = []
    for n in fsdp_sizes:
        state = train_state_bytes(shapes["unet"], n, min_size=min_size)
        row = {"fsdp": n, **{f"unet_{k}": v for k, v in state.items()}}
        row["frozen"] = per_device_bytes(frozen, n, min_size)
        row["total"] = row["unet_total"] + row["frozen"]
        rows.append(row)
    return rows
