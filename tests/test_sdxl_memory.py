"""The full-size SDXL InstructPix2Pix training memory report (shapes only, jax.eval_shape): its
networks have diffusers' / transformers' parameter counts, and fsdp divides the state."""
from __future__ import annotations

import pytest

from ip2p_jax.train import memory
from ip2p_jax.weights.components import count_params


@pytest.mark.slow   # tracing the 2.6 B-parameter UNet for its shapes takes ~20 s on 2 cores
def test_sdxl_report_counts_and_shards():
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    shapes = memory.sdxl_abstract_params()
    with torch.device("meta"):   # the references' counts, nothing allocated
        refs = {"unet": UNet2DConditionModel(**memory.SDXL_IP2P_UNET), "vae": AutoencoderKL(**memory.SDXL_VAE),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**memory.SDXL_TEXT)),
                "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**memory.SDXL_TEXT_2))}
    for name, ref in refs.items():
        assert count_params(shapes[name]) == sum(p.numel() for p in ref.parameters()), name
    n = count_params(shapes["unet"])
    rows = {r["fsdp"]: r for r in memory.sdxl_memory_report((1, 4, 8))}
    assert rows[1]["unet_params"] == rows[1]["unet_ema"] == 4 * n
    assert rows[1]["unet_optimizer"] >= 8 * n    # AdamW's two fp32 moments of the flat vector
    for k in (4, 8):   # all but a few small replicated arrays divide by fsdp
        assert rows[1]["unet_total"] / k <= rows[k]["unet_total"] < 1.01 * rows[1]["unet_total"] / k
        assert rows[k]["total"] == rows[k]["unet_total"] + rows[k]["frozen"]
