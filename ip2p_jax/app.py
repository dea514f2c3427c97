"""Web UI for editing: `python -m ip2p_jax.app [--model M] [--port 7860] [--share]`.

Needs gradio, the optional [app] extra (`pip install 'ip2p_jax[app]'`); nothing else in
ip2p_jax imports it. Like the authors' app it can randomise the seed and the guidance scales
(text U[6, 9], image U[1.2, 1.8]) and always shows the seed and scales it used.
"""
from __future__ import annotations

import argparse
import random
import sys

from ip2p_jax.commands.edit import DEFAULT_STEPS, choose_model, default_steps
from ip2p_jax.diffusion import SAMPLERS
from ip2p_jax.errors import Ip2pError
from ip2p_jax.images import RESIZE_MODES
from ip2p_jax.pipeline import EditPipeline

MISSING_GRADIO = ("the web UI needs gradio, which is not installed: pip install 'ip2p_jax[app]' "
                  "(or pip install gradio)")


class AppError(Ip2pError):
    """The UI cannot start (missing optional dependency, no model)."""


def require_gradio():
    try:
        import gradio  # optional heavy dependency (the [app] extra)
    except ImportError:
        raise AppError(MISSING_GRADIO) from None
    return gradio


def edit_once(pipe, image, instruction: str, *, steps: int = DEFAULT_STEPS, seed: int | None = None,
              randomize_seed: bool = True, text_scale: float = 7.5, image_scale: float = 1.5,
              randomize_scales: bool = False, resolution: int | None = None, resize: str = "authors",
              sampler: str = "euler_a"):
    """What the UI's Generate button does: returns (PIL image, seed, text scale, image scale)."""
    if image is None:
        raise AppError("load an image first")
    if randomize_seed or seed is None:
        seed = random.SystemRandom().randrange(2 ** 31)
    res = pipe.edit(image, instruction or "", steps=int(steps), seed=int(seed), text_scale=float(text_scale),
                    image_scale=float(image_scale), randomize_scales=randomize_scales,
                    resolution=None if resolution is None else int(resolution), resize=resize, sampler=sampler, progress=False)
    s = res.settings[0]
    return res.images[0], s["seed"], s["text_scale"], s["image_scale"]


def build_ui(pipe, gr=None, *, steps_default: int = DEFAULT_STEPS):
    """The gradio Blocks app around `pipe` (an EditPipeline); the resolution defaults to the
    model's native size."""
    gr = gr or require_gradio()

    with gr.Blocks(title="InstructPix2Pix (ip2p_jax)") as ui:
        gr.Markdown("## InstructPix2Pix in JAX: edit an image from a written instruction")
        with gr.Row():
            source = gr.Image(type="pil", label="Input image")
            result = gr.Image(type="pil", label="Edited image", interactive=False)
        instruction = gr.Textbox(label="Edit instruction", placeholder="make it winter")
        with gr.Row():
            steps = gr.Number(value=steps_default, precision=0, label="Steps")
            seed = gr.Number(value=1371, precision=0, label="Seed")
            randomize_seed = gr.Checkbox(value=True, label="Randomize seed")
            sampler = gr.Dropdown(list(SAMPLERS), value="euler_a", label="Sampler")
        with gr.Row():
            text_scale = gr.Number(value=7.5, label="Text CFG")
            image_scale = gr.Number(value=1.5, label="Image CFG")
            randomize_scales = gr.Checkbox(value=False, label="Randomize CFG")
            resolution = gr.Number(value=pipe.native_resolution, precision=0, label="Resolution")
            resize = gr.Dropdown(list(RESIZE_MODES), value="authors", label="Resize")
        go = gr.Button("Generate", variant="primary")

        def run(img, text, n, s, rs, ts, i_s, rc, r, mode, smp):
            try:
                return edit_once(pipe, img, text, steps=n, seed=s, randomize_seed=rs, text_scale=ts,
                                 image_scale=i_s, randomize_scales=rc, resolution=r, resize=mode, sampler=smp)
            except Ip2pError as e:   # bad input: show the message; anything else is a bug
                raise gr.Error(str(e)) from None

        go.click(run, [source, instruction, steps, seed, randomize_seed, text_scale, image_scale,
                       randomize_scales, resolution, resize, sampler],
                 [result, seed, text_scale, image_scale])
    return ui


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ip2p_jax.app", description="InstructPix2Pix web UI")
    ap.add_argument("--model", help="diffusers folder, checkpoint file or hub id (default: the demo model)")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--share", action="store_true", help="ask gradio for a public link")
    ap.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: bf16 on GPU/TPU, fp32 on CPU)")
    args = ap.parse_args(argv)
    try:
        gr = require_gradio()   # fail fast, before loading a model
        model, is_demo = choose_model(args.model)
        pipe = EditPipeline.from_pretrained(model, dtype=args.dtype)
    except Ip2pError as e:
        print(f"ip2p app: error: {e}", file=sys.stderr)
        return 2
    steps = default_steps(is_demo)
    print(f"ip2p app: using {model} ({'no --model given: the demo model' if is_demo else '--model'}); "
          f"defaults {steps} steps, resolution {pipe.native_resolution}", file=sys.stderr)
    build_ui(pipe, gr, steps_default=steps).launch(server_port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
