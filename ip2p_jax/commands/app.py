"""`ip2p app`: the web UI (ip2p_jax/app.py) on this machine.

Serves on 127.0.0.1 only unless --host says otherwise; --share (a public gradio link) is opt-in.
Both log a warning: the UI then takes requests from anyone who can reach it (within its limits).
"""
from __future__ import annotations

import argparse
import ipaddress
import logging

from ip2p_jax import app, images
from ip2p_jax.commands.edit import DEMO_STEPS, choose_model, default_steps
from ip2p_jax.edit_request import MAX_STEPS
from ip2p_jax.pipeline import EditPipeline

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="diffusers folder, checkpoint file or hub id (default: the demo model)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to serve on (default 127.0.0.1: this machine only; 0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=None, help="port (default: gradio's, 7860 or the next free one)")
    p.add_argument("--share", action="store_true", help="also serve on a public gradio.live link (anyone with it)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto: bf16 on GPU/TPU, fp32 on CPU")
    p.add_argument("--steps", type=int, default=None,
                   help=f"default step count, added to the step menu {app.STEP_MENU} "
                        f"(default: 100; {DEMO_STEPS} for the demo model)")
    p.add_argument("--max-samples", type=int, default=4, help="most results per Generate")
    p.add_argument("--max-sweep-cells", type=int, default=16, help="most cells in a guidance sweep")
    p.add_argument("--max-edit-pixels", type=int, default=images.DEFAULT_MAX_EDIT_PIXELS,
                   help="most pixels of an edit after resizing (also bounds the resolution menu)")
    p.add_argument("--max-pixels", type=int, default=images.DEFAULT_MAX_PIXELS,
                   help="most pixels of an uploaded image")
    p.add_argument("--max-file-size", default="20mb", help="largest upload, e.g. 20mb")
    p.add_argument("--queue-size", type=int, default=16, help="most requests waiting; more are turned away")
    p.add_argument("--concurrency", type=int, default=1, help="requests computed at once")
    p.add_argument("--time-limit", type=float, default=300.0,
                   help="seconds per request; a request past it hands out no more results")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args) -> int:
    gr = app.require_gradio()   # fail fast, before loading a model
    model, is_demo = choose_model(args.model)
    steps = args.steps if args.steps is not None else default_steps(is_demo)
    if not 1 <= steps <= MAX_STEPS:
        raise app.AppError(f"--steps must be from 1 to {MAX_STEPS}, got {steps}")
    if not _is_loopback(args.host):
        log.warning("serving on %s: anyone who can reach this address can use the UI (and this machine's "
                    "accelerator) within its limits", args.host)
    if args.share:
        log.warning("--share: the UI becomes public on a gradio.live link; anyone with the link can use it")
    pipe = EditPipeline.from_pretrained(model, dtype=None if args.dtype == "auto" else args.dtype)
    limits = app.Limits.for_model(pipe.native_resolution, steps, max_samples=args.max_samples,
                                  max_sweep_cells=args.max_sweep_cells, max_pixels=args.max_pixels,
                                  max_edit_pixels=args.max_edit_pixels, max_file_size=args.max_file_size,
                                  queue_size=args.queue_size, concurrency=args.concurrency,
                                  time_limit=args.time_limit)
    print(f"ip2p app: using {model} "
          f"({'no --model given: the demo model, which knows only the synthetic shapes world' if is_demo else '--model'});"
          f" default {steps} steps, resolution {pipe.native_resolution} (the model's native size)", flush=True)
    ui = app.build_ui(pipe, limits, steps_default=steps, gr=gr)
    app.launch(ui, limits, host=args.host, port=args.port, share=args.share)
    return 0
