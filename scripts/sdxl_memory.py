"""Per-device bytes of full-size SDXL InstructPix2Pix training at several fsdp sizes, as a markdown table.

    python scripts/sdxl_memory.py            # fsdp = 1, 4, 8
    python scripts/sdxl_memory.py 2 16       # other sizes

Shapes only (jax.eval_shape on the full-size configs in ip2p_jax/train/memory.py; no weights), sharded
by the rule MeshRunner uses (train.parallel.fsdp_spec): the UNet's fp32 params, EMA and AdamW state,
and the frozen fp32 VAE and two text encoders. Activations and gradients come on top.
"""
from __future__ import annotations

import sys

from ip2p_jax.train.memory import sdxl_memory_report

GIB = 2 ** 30
COLUMNS = (("unet_params", "UNet params"), ("unet_ema", "EMA"), ("unet_optimizer", "AdamW state"),
           ("frozen", "frozen VAE + encoders"), ("total", "total per device"))


def markdown_table(rows: list[dict]) -> str:
    """The report's rows (sdxl_memory_report) as the docs' markdown table, in GiB."""
    lines = ["| `parallel.fsdp` | " + " | ".join(title for _, title in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append(f"| {r['fsdp']} | " + " | ".join(f"{r[key] / GIB:.1f} GiB" for key, _ in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    sizes = tuple(int(a) for a in argv) or (1, 4, 8)
    sys.stdout.write(markdown_table(sdxl_memory_report(sizes)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
