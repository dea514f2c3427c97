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
