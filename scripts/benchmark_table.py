#!/usr/bin/env python3
"""One table from the benchmark scripts' JSON lines (benchmark_edit / peer_edit / benchmark_train /
peer_train): ours, the peer eager and compiled, the ratio to the faster peer, MFU, peak memory.

  python scripts/benchmark_table.py bench_out/*.jsonl
"""
from __future__ import annotations

import json
import sys


def read(paths):
    rows = []
    for path in paths:
        for line in open(path):
            line = line.strip()
            if line.startswith("{"):
                row = json.loads(line)
                if "batch" in row and "error" not in row:
                    rows.append(row)
    return rows


def fmt(x, digits=2):
    return "–" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


def table_row(name, ours, peer, peer_cells, rate: str) -> str:
    """One markdown row: name, our rate, the peer's rate cells, ours / peer, both MFUs and peak memories."""
    ratio = ours[rate] / peer[rate] if ours and peer else None
    get = lambda r, k: r and r.get(k)  # noqa: E731
    cells = [name, fmt(get(ours, rate)), *peer_cells, f"{fmt(ratio)}×", fmt(get(ours, "mfu"), 3),
             fmt(get(peer, "mfu"), 3), fmt(get(ours, "peak_mem_gib")), fmt(get(peer, "peak_mem_gib"))]
    return "| " + " | ".join(cells) + " |"


def edit_table(rows) -> list[str]:
    """One row per batch, plus one per variant of ours (benchmark_edit --label, e.g. other XLA flags)."""
    edits = [r for r in rows if "images_per_s" in r]
    out = ["| edit, batch | ip2p_jax img/s | diffusers eager | diffusers compiled | ours ÷ best peer | ours MFU "
           "| peer MFU | ours peak GiB | peer peak GiB |", "|---|---|---|---|---|---|---|---|---|"]
    variants = sorted({r["impl"] for r in edits if r["impl"].startswith("ip2p_jax ")})
    ours_labels = ["ip2p_jax"] + variants
    for b in sorted({r["batch"] for r in edits}):
        eager = next((r for r in edits if r["batch"] == b and r["impl"] == "diffusers eager"), None)
        comp = next((r for r in edits if r["batch"] == b and r["impl"] == "diffusers compiled"), None)
        peers = [p for p in (eager, comp) if p]
        best = max(peers, key=lambda p: p["images_per_s"]) if peers else None
        for label in ours_labels:
            ours = next((r for r in edits if r["batch"] == b and r["impl"] == label), None)
            if ours is None and label != "ip2p_jax":
                continue
            name = str(b) if label == "ip2p_jax" else f"{b} ({label.removeprefix('ip2p_jax').strip()})"
            peer_cells = [fmt(eager and eager["images_per_s"]), fmt(comp and comp["images_per_s"])]
            out.append(table_row(name, ours, best, peer_cells, "images_per_s"))
    return out


def train_table(rows) -> list[str]:
    trains = [r for r in rows if "examples_per_s" in r]
    out = ["| train, batch | ip2p_jax live ex/s | ip2p_jax cached ex/s | diffusers ex/s | live ÷ diffusers "
           "| ours MFU (live) | peer MFU | ours peak GiB | peer peak GiB |", "|---|---|---|---|---|---|---|---|---|"]
    for b in sorted({r["batch"] for r in trains}):
        live = next((r for r in trains if r["batch"] == b and r.get("bench") == "ip2p_jax-train"
                     and not r.get("cached")), None)
        cached = next((r for r in trains if r["batch"] == b and r.get("bench") == "ip2p_jax-train"
                       and r.get("cached")), None)
        peer = next((r for r in trains if r["batch"] == b and str(r.get("bench")).startswith("diffusers")), None)
        peer_cells = [fmt(cached and cached["examples_per_s"]), fmt(peer and peer["examples_per_s"])]
        out.append(table_row(str(b), live, peer, peer_cells, "examples_per_s"))
    return out


def main(argv=None) -> int:
    rows = read(argv if argv is not None else sys.argv[1:])
    lines = []
    if any("images_per_s" in r for r in rows):
        lines += edit_table(rows) + [""]
    if any("examples_per_s" in r for r in rows):
        lines += train_table(rows)
    print("\n".join(lines) if lines else "no benchmark rows found")
    return 0


if __name__ == "__main__":
    sys.exit(main())
