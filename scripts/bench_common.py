"""What the benchmark scripts share: the SD 1.5 FLOP figures, device peaks for MFU, peak memory.

FLOPs are per forward of one image row on the SD 1.5 architecture at 512^2 (64^2 latents),
attention included (convolutions, linears and the QK^T / PV products); other resolutions scale
by pixel count (attention grows faster, so that slightly underestimates above 512^2 and
overestimates below). A training step counts the UNet three times (forward + backward).
"""
from __future__ import annotations

UNET_GFLOP_512 = 803.0       # UNet forward
VAE_ENCODE_GFLOP_512 = 1100.0
VAE_DECODE_GFLOP_512 = 2500.0
CLIP_TEXT_GFLOP = 13.0       # one 77-token sequence through CLIP ViT-L/14's text tower

# The benchmarked architectures (diffusers / transformers config keys): SD 1.5 InstructPix2Pix and
# tiny stand-ins for checking a script on CPU.
SD15_UNET = dict(sample_size=64, in_channels=8, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                 layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2, sample_size=512,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
TINY_UNET = dict(sample_size=8, in_channels=8, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                 cross_attention_dim=32, attention_head_dim=4, norm_num_groups=32,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TINY_VAE = dict(block_out_channels=(32, 64), latent_channels=4, norm_num_groups=32,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
TINY_CLIP = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=77)

# Dense bf16 peak TFLOP/s by device kind (the first listed name found in jax's device_kind).
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L4": 121.0, "TPU v6": 918.0,
               "TPU v5p": 459.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v4": 275.0}


def edit_gflop_per_image(res: int, steps: int) -> float:
    """A dual-guidance edit: 3 UNet rows per step, one encode, one decode."""
    s = (res / 512) ** 2
    return s * (3 * steps * UNET_GFLOP_512 + VAE_ENCODE_GFLOP_512 + VAE_DECODE_GFLOP_512) + CLIP_TEXT_GFLOP


def train_gflop_per_example(res: int, cached: bool) -> float:
    """UNet forward + backward; with live encoders also two VAE encodes and the text encoder."""
    s = (res / 512) ** 2
    unet = 3 * UNET_GFLOP_512 * s
    return unet if cached else unet + 2 * VAE_ENCODE_GFLOP_512 * s + CLIP_TEXT_GFLOP


def peak_tflops(device_kind: str):
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_kind), None)


def mfu(tflops, device_kind: str):
    peak = peak_tflops(device_kind)
    return None if tflops is None or peak is None else round(tflops / peak, 3)


def peak_memory_gib():
    import jax
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else round(peak / 2 ** 30, 2)
