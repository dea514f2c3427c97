"""`ip2p convert SOURCE OUT`: any checkpoint we read -> a diffusers folder (the format we use).

SOURCE is a diffusers folder, a single-file .ckpt/.safetensors in the original layout, or a hub id.
"""
from __future__ import annotations

import dataclasses

from ip2p_jax.weights import WeightsError, expand_conv_in, load, save_diffusers_folder
from ip2p_jax.weights.lora import merge_lora, parse_lora_arg, read_lora
from ip2p_jax.weights.output_folder import check_output_folder


def add_arguments(parser) -> None:
    parser.add_argument("source", help="a diffusers folder, a single-file .ckpt/.safetensors "
                                       "(original Stable Diffusion layout), or a hub id such as timbrooks/instruct-pix2pix")
    parser.add_argument("out", help="output folder (diffusers layout: ip2p_jax and diffusers both load it)")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                        help="dtype of the weights written")
    parser.add_argument("--no-ema", action="store_true",
                        help="single files holding model_ema.*: take the non-EMA UNet weights (default: EMA)")
    parser.add_argument("--to-8-channels", action="store_true",
                        help="widen a 4-channel Stable Diffusion UNet's conv_in to InstructPix2Pix's 8 "
                             "(extra channels zero, so outputs are unchanged)")
    parser.add_argument("--merge-lora", action="append", default=[], metavar="FILE[:SCALE]",
                        help="add a LoRA's update (diffusers / PEFT / kohya file) to the weights at SCALE "
                             "(default 1); repeat for several")
    parser.add_argument("--variant", help="read <name>.<VARIANT>.safetensors (e.g. fp16) from folders / hub ids")
    parser.add_argument("--config", metavar="FOLDER",
                        help="single files: a diffusers folder of the same architecture whose configs, tokenizer "
                             "and scheduler to use (default: Stable Diffusion 1.5, in_channels from the file)")
    parser.add_argument("--tokenizer", metavar="FOLDER",
                        help="single files: tokenizer folder (default: --config's, else CLIP ViT-L/14 from the hub)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT if it is a model folder written by ip2p_jax (atomically)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow .ckpt/.bin pickles holding Python objects besides tensors (runs their code)")


def run(args) -> int:
    check_output_folder(args.out, overwrite=args.overwrite)   # before loading anything
    loras = [(read_lora(path), scale) for path, scale in map(parse_lora_arg, args.merge_lora)]
    try:
        components = load(args.source, dtype=args.dtype, variant=args.variant, config=args.config,
                          prefer_ema=not args.no_ema, tokenizer=args.tokenizer, trust_pickle=args.trust_pickle,
                          progress=True)
        if args.to_8_channels:
            old = components.unet_config.in_channels
            params, config = expand_conv_in(components.unet_params, components.unet_config, 8)
            components = dataclasses.replace(components, unet_params=params, unet_config=config)
            components.notes.append(f"UNet conv_in widened from {old} to 8 input channels (extra kernels zero, bias kept)"
                                    if old != 8 else "UNet already has 8 input channels")
        if loras:   # kernel + updates summed in fp32, stored in --dtype
            components = merge_lora(components, loras)
        out = save_diffusers_folder(components, args.out, overwrite=args.overwrite, progress=True)
    except OSError as e:  # permissions, full disk, ...: one line, not a traceback
        raise WeightsError(f"{e.filename or args.out}: {e.strerror or e}") from None
    print(summary(components, out))
    return 0


def summary(components, out: str) -> str:
    counts, dtypes = components.param_counts(), components.dtypes()
    lines = [f"wrote {out}", f"  from {components.source}",
             f"  {'component':<14}{'parameters':>14}  dtype"]
    for name, n in counts.items():
        lines.append(f"  {name:<14}{n:>14,}  {dtypes[name]}")
    lines.append(f"  {'total':<14}{sum(counts.values()):>14,}")
    lines.append(f"  UNet input channels: {components.unet_config.in_channels}; scheduler: "
                 f"{components.scheduler_config.get('_class_name', '?')}")
    lines += [f"  note: {n}" for n in components.notes]
    return "\n".join(lines)
