"""The web UI for editing, started by `ip2p app` (ip2p_jax/commands/app.py).

Needs gradio, the optional [app] extra (`pip install 'ip2p_jax[app]'`); nothing else in ip2p_jax
imports it, and it is imported only when a UI is built. Like the authors' app it can randomise the
seed and the guidance scales (text U[6, 9], image U[1.2, 1.8]) and always shows the values it used.
A second tab computes a guidance sweep (rows image scale, columns text scale) in one batched call.
A third keeps a multi-turn session: a list of turns (turn 0 the upload), any of which the next
instruction can continue from. An optional mask upload (white = editable) restricts the edits.
Every result comes with its settings sidecar, the JSON `ip2p edit` writes.

The UI is meant to face untrusted users, so every request is bounded (`Limits`): steps and
resolution come from fixed menus (a bounded set of compiled shapes, so memory cannot grow with
the requests), the sample count and the sweep size are capped, uploads are size-limited and
decoded by ip2p_jax.images (pixel budget, decompression bombs), the queue is bounded with a
concurrency limit, and a request stops handing out results past its time limit.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import random
import re
import shutil
import tempfile
import time

import numpy as np
from PIL import Image

from ip2p_jax import images, masks
from ip2p_jax.commands.edit import sidecar, sweep_grid, write_result
from ip2p_jax.diffusion import SAMPLERS
from ip2p_jax.errors import Ip2pError
from ip2p_jax.edit_request import MAX_NUM_SAMPLES, MAX_STEPS, SEED_LIMIT, check_request

log = logging.getLogger(__name__)

MISSING_GRADIO = ("the web UI needs gradio, which is not installed: pip install 'ip2p_jax[app]' "
                  "(or pip install gradio)")
STEP_MENU = (10, 20, 50, 100)                       # plus the app's default step count
RESOLUTION_MENU = (64, 128, 256, 384, 512, 640, 768, 1024)
UPLOAD_TYPES = [".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"]
KEEP_REQUESTS = 64                                  # result folders kept on disk for download


class AppError(Ip2pError):
    """The UI cannot start (missing optional dependency, no model) or a request is out of bounds;
    the message names the UI field."""


def require_gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")   # a local tool: no usage reports
    try:
        import gradio  # optional heavy dependency (the [app] extra)
    except ImportError:
        raise AppError(MISSING_GRADIO) from None
    return gradio


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for. steps / resolutions: the menus offered (and accepted)."""
    steps: tuple[int, ...]
    resolutions: tuple[int, ...]
    max_samples: int = 4
    max_sweep_cells: int = 16
    max_pixels: int = images.DEFAULT_MAX_PIXELS            # an upload's pixels, before resizing
    max_edit_pixels: int = images.DEFAULT_MAX_EDIT_PIXELS  # an edit's pixels, after resizing
    max_file_size: str = "20mb"                            # an upload's bytes
    queue_size: int = 16                                   # requests waiting
    concurrency: int = 1                                   # requests computed at once
    time_limit: float = 300.0                              # seconds; no results are handed out past it

    @classmethod
    def for_model(cls, native_resolution: int, default_steps: int, **kwargs) -> "Limits":
        """Menus for a model: its default steps with STEP_MENU, and resolutions up to twice its
        native size within the edit-pixel budget."""
        max_edit = kwargs.get("max_edit_pixels", images.DEFAULT_MAX_EDIT_PIXELS)
        steps = sorted({default_steps, *STEP_MENU} & set(range(1, MAX_STEPS + 1)))
        res = sorted({native_resolution} | {r for r in RESOLUTION_MENU
                                            if r <= 2 * native_resolution and r * r <= max_edit})
        limits = cls(steps=tuple(steps), resolutions=tuple(res), **kwargs)
        if not 1 <= limits.max_samples <= MAX_NUM_SAMPLES:
            raise AppError(f"--max-samples must be from 1 to {MAX_NUM_SAMPLES}, got {limits.max_samples}")
        for name in ("max_sweep_cells", "queue_size", "concurrency", "time_limit"):
            if getattr(limits, name) <= 0:
                raise AppError(f"--{name.replace('_', '-')} must be positive, got {getattr(limits, name)}")
        return limits


# ---------------------------------------------------------------------- requests (no gradio)

def _field_error(field: str, e: Exception) -> AppError:
    return AppError(f"{field}: {re.sub(r'^[a-z_]+ / --[a-z-]+ ', '', str(e))}")


def _integer(value, field: str) -> int:
    try:
        f = float(value)
        if f != int(f):
            raise ValueError
        return int(f)
    except (TypeError, ValueError, OverflowError):
        raise AppError(f"{field}: expected a whole number, got {value!r}") from None


def _scale(value, field: str) -> float:
    try:
        v = float(value)
        check_request(steps=1, text_scale=v)
    except (TypeError, ValueError) as e:
        raise _field_error(field, e if isinstance(e, Ip2pError) else AppError(
            f"must be a finite number, got {value!r}")) from None
    return v


def parse_scales(text: str, field: str) -> list[float]:
    """'3, 5, 7.5' -> [3.0, 5.0, 7.5]; AppError naming `field` otherwise."""
    parts = [p for p in re.split(r"[,\s]+", str(text or "").strip()) if p]
    if not parts:
        raise AppError(f"{field}: give at least one number, e.g. 1, 1.5, 2")
    return [_scale(p, field) for p in parts]


def check_settings(limits: Limits, *, steps, resolution, seed=None, text_scale=7.5, image_scale=1.5,
                   num_samples=1, sampler="euler_a") -> dict:
    """The request's settings as numbers, or AppError naming the UI field that is out of bounds."""
    steps, resolution = _integer(steps, "Steps"), _integer(resolution, "Resolution")
    if steps not in limits.steps:
        raise AppError(f"Steps: choose one of {', '.join(map(str, limits.steps))}, got {steps}")
    if resolution not in limits.resolutions:
        raise AppError(f"Resolution: choose one of {', '.join(map(str, limits.resolutions))}, got {resolution}")
    num_samples = _integer(num_samples, "Samples")
    if not 1 <= num_samples <= limits.max_samples:
        raise AppError(f"Samples: must be from 1 to {limits.max_samples}, got {num_samples}")
    if sampler not in SAMPLERS:
        raise AppError(f"Sampler: choose one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if seed is not None:
        seed = _integer(seed, "Seed")
        if not 0 <= seed < SEED_LIMIT - limits.max_sweep_cells - limits.max_samples:
            raise AppError(f"Seed: must be from 0 to {SEED_LIMIT - limits.max_sweep_cells - limits.max_samples - 1}, "
                           f"got {seed}")
    return dict(steps=steps, resolution=resolution, num_samples=num_samples, sampler=sampler, seed=seed,
                text_scale=_scale(text_scale, "Text CFG"), image_scale=_scale(image_scale, "Image CFG"))


def load_upload(path, limits: Limits, name: str | None = None):
    """The uploaded file as RGB (ip2p_jax.images rules), or AppError saying why not."""
    if not path:
        raise AppError("Input image: upload an image first")
    name = name or os.path.basename(str(path))
    try:
        if os.path.getsize(path) == 0:
            raise AppError(f"Input image: {name} is empty")
        img = images.load_image(str(path), max_pixels=limits.max_pixels)
    except images.ImageError as e:
        raise AppError("Input image: " + str(e).replace(str(path), name)) from None
    return img


def _request_dir(root: str) -> str:
    """A fresh folder for one request's downloads; the oldest beyond KEEP_REQUESTS are removed."""
    os.makedirs(root, exist_ok=True)
    old = sorted((e for e in os.scandir(root) if e.is_dir()), key=lambda e: e.stat().st_mtime)
    for e in old[:max(0, len(old) - KEEP_REQUESTS + 1)]:
        shutil.rmtree(e.path, ignore_errors=True)
    return tempfile.mkdtemp(dir=root)


def _stem(text: str) -> str:
    return (re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:40].rstrip("-") or "edit")


def load_mask_upload(path, blur, name: str | None = None):
    """(the uploaded mask as a grayscale PIL image or None, its feathering) or AppError naming the field."""
    if not path:
        return None, 0.0
    name = name or os.path.basename(str(path))
    try:
        return masks.load_mask(str(path), name=name), masks.check_blur(blur or 0.0)
    except images.ImageError as e:
        raise AppError("Mask: " + str(e).replace(str(path), name)) from None


def brush_mask(value):
    """The strokes painted in the UI's image editor as a grayscale mask (their alpha: white where
    painted), or None when nothing is painted. value: gradio's EditorValue ({"layers": [PIL], ...})."""
    layers = [layer for layer in ((value or {}).get("layers") or []) if layer is not None]
    alphas = [np.asarray(layer.convert("RGBA"))[..., 3] for layer in layers]
    if not alphas or not any(a.any() for a in alphas):
        return None
    return Image.fromarray(np.maximum.reduce(alphas), "L")


def request_mask(upload_path, painted, blur):
    """(mask, feathering) of a request: the uploaded mask or the painted one (not both), or (None, 0)."""
    drawn = brush_mask(painted)
    if upload_path and drawn is not None:
        raise AppError("Mask: upload a mask or paint one, not both (clear the strokes or the upload)")
    if drawn is not None:
        return drawn, masks.check_blur(blur or 0.0)
    return load_mask_upload(upload_path, blur)


def generate(pipe, image, instruction: str, limits: Limits, out_root: str, *, seed=None,
             randomize_seed: bool = True, randomize_scales: bool = False, name: str = "upload", mask=None,
             mask_blur: float = 0.0, extra_settings: dict | None = None, **settings):
    """The Generate button: edit `image` (PIL RGB) num_samples times (only where `mask`, a PIL
    image, is white). Returns (outputs, files, seed, text scale, image scale): files are each
    result's PNG and its JSON sidecar (with `extra_settings` added)."""
    s = check_settings(limits, seed=None if randomize_seed else seed, **settings)
    if s["seed"] is None:
        s["seed"] = random.SystemRandom().randrange(2 ** 31)
    start, outs = time.monotonic(), []
    for out in pipe.iter_edit(image, instruction or "", steps=s["steps"], seed=s["seed"],
                              text_scale=s["text_scale"], image_scale=s["image_scale"],
                              randomize_scales=randomize_scales, num_samples=s["num_samples"],
                              resolution=s["resolution"], resize="authors", sampler=s["sampler"],
                              names=[name], max_pixels=limits.max_pixels, max_edit_pixels=limits.max_edit_pixels,
                              mask=mask, mask_blur=mask_blur):
        out.settings.update(extra_settings or {})
        outs.append(out)
        if time.monotonic() - start > limits.time_limit and len(outs) < s["num_samples"]:
            raise AppError(f"Samples: stopped after {len(outs)} of {s['num_samples']} results, past the "
                           f"time limit of {limits.time_limit:g} s; ask for fewer samples or steps")
    outs.sort(key=lambda o: o.settings["index"])
    folder, paths = _request_dir(out_root), []
    for out in outs:
        png = write_result(folder, f"{_stem(instruction)}_{out.settings['seed']}", out.image,
                           sidecar(name, pipe.source, out.settings))
        paths += [png, png[:-4] + ".json"]
    first = outs[0].settings
    return outs, paths, first["seed"], first["text_scale"], first["image_scale"]


def continue_session(pipe, history: list, from_turn, instruction: str, limits: Limits, out_root: str, **kwargs):
    """The session tab: edit turn `from_turn` of `history` (a list of {"image", "settings",
    "files"}; turn 0 the upload, settings None) with `instruction`; returns the new history:
    turns 0..from_turn, then the new turn (later turns are dropped: the session branches there).
    kwargs: generate's (seed, scales, steps, mask, ...); one result per turn."""
    k = _integer(from_turn, "Continue from turn")
    if not history:
        raise AppError("Input image: upload an image first")
    if not 0 <= k < len(history):
        raise AppError(f"Continue from turn: choose a turn from 0 to {len(history) - 1}, got {k}")
    if not (instruction or "").strip():
        raise AppError("Edit instruction: write the next turn's instruction")
    earlier = [h["settings"] for h in history[1:k + 1]]
    session = {"turn": k + 1, "previous_seed": earlier[-1]["seed"] if earlier else None,
               "history": [{"instruction": e["instruction"], "seed": e["seed"]} for e in earlier]}
    outs, paths, *_ = generate(pipe, history[k]["image"], instruction, limits, out_root,
                               extra_settings=session, **{**kwargs, "num_samples": 1})
    return history[:k + 1] + [{"image": outs[0].image, "settings": outs[0].settings, "files": paths}]


def session_gallery(history: list) -> list:
    """(image, caption) per turn, for the UI's list of turns."""
    return [(h["image"], "turn 0: input" if h["settings"] is None
             else f"turn {i}: {h['settings']['instruction']} (seed {h['settings']['seed']})")
            for i, h in enumerate(history)]


def sweep(pipe, image, instruction: str, limits: Limits, out_root: str, *, text_scales: str,
          image_scales: str, seed=None, randomize_seed: bool = True, name: str = "upload", **settings):
    """The sweep tab: one grid over the text x image scales, one batched call, the same seed in
    every cell. Returns (grid, [grid PNG, its JSON sidecar], seed, the cells' EditOutputs)."""
    ts, ims = parse_scales(text_scales, "Text scales"), parse_scales(image_scales, "Image scales")
    if len(ts) * len(ims) > limits.max_sweep_cells:
        raise AppError(f"Text scales x Image scales: {len(ts)}x{len(ims)} = {len(ts) * len(ims)} cells, "
                       f"more than the limit of {limits.max_sweep_cells}")
    s = check_settings(limits, seed=None if randomize_seed else seed, **settings)
    if s["seed"] is None:
        s["seed"] = random.SystemRandom().randrange(2 ** 31)
    grid, meta, cells = sweep_grid(pipe, image, instruction or "", ts, ims, s["seed"], name=name,
                                   steps=s["steps"], resolution=s["resolution"], resize="authors",
                                   sampler=s["sampler"], max_pixels=limits.max_pixels,
                                   max_edit_pixels=limits.max_edit_pixels)
    png = write_result(_request_dir(out_root), f"{_stem(instruction)}_{s['seed']}_grid", grid, meta)
    return grid, [png, png[:-4] + ".json"], s["seed"], cells


# ---------------------------------------------------------------------- the gradio app

def build_ui(pipe, limits: Limits, *, steps_default: int, out_root: str | None = None, gr=None):
    """The gradio Blocks app around `pipe` (an EditPipeline), queued within `limits`."""
    gr = gr or require_gradio()
    out_root = out_root or tempfile.mkdtemp(prefix="ip2p_app_")

    def guard(fn):   # project errors become the UI's error message; anything else is a bug
        def wrapped(*args):
            try:
                return fn(*args)
            except Ip2pError as e:
                raise gr.Error(str(e), print_exception=False) from None
        return wrapped

    def upload(path):
        if not path:
            return None
        return load_upload(path, limits)

    def common_inputs():
        with gr.Row():
            steps = gr.Dropdown(list(limits.steps), value=steps_default, label="Steps")
            resolution = gr.Dropdown(list(limits.resolutions), value=pipe.native_resolution, label="Resolution")
            sampler = gr.Dropdown(list(SAMPLERS), value=pipe.default_sampler, label="Sampler")
            seed = gr.Number(value=1371, precision=0, label="Seed")
            randomize_seed = gr.Checkbox(value=True, label="Randomize seed")
        return steps, resolution, sampler, seed, randomize_seed

    with gr.Blocks(title="InstructPix2Pix (ip2p_jax)", delete_cache=(600, 3600)) as ui:
        gr.Markdown("## InstructPix2Pix in JAX: edit an image from a written instruction")
        with gr.Row():
            source = gr.File(label="Input image", file_types=UPLOAD_TYPES, type="filepath", elem_id="source")
            preview = gr.Image(type="pil", label="Input", interactive=False, elem_id="preview")
        instruction = gr.Textbox(label="Edit instruction", placeholder="make it winter", elem_id="instruction")
        source.change(guard(upload), [source], [preview])

        with gr.Tab("Edit"):
            steps, resolution, sampler, seed, randomize_seed = common_inputs()
            with gr.Row():
                text_scale = gr.Number(value=pipe.default_text_scale, label="Text CFG")
                image_scale = gr.Number(value=1.5, label="Image CFG")
                randomize_scales = gr.Checkbox(value=False, label="Randomize CFG")
                samples = gr.Slider(1, limits.max_samples, value=1, step=1, label="Samples")
            with gr.Row():
                brush = gr.ImageEditor(type="pil", image_mode="RGBA", sources=(), transforms=(), layers=False,
                                       label="Mask (optional): paint the region to edit", elem_id="brush")
                mask_file = gr.File(label="...or upload a mask: white = editable, black = kept",
                                    file_types=UPLOAD_TYPES, type="filepath", elem_id="mask")
                mask_blur = gr.Slider(0, 32, value=0, step=1, label="Mask feathering (pixels)")
            source.change(guard(lambda p: {"background": upload(p), "layers": [], "composite": None}),
                          [source], [brush])
            go = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Row():
                result = gr.Image(type="pil", label="Edited image", interactive=False, format="png", elem_id="result")
                downloads = gr.File(label="Downloads: PNG + settings (JSON)", file_count="multiple",
                                    interactive=False, elem_id="downloads")

            def run(path, text, n, res, smp, sd, rs, ts, i_s, rc, k, mpath, painted, mblur):
                img = load_upload(path, limits)
                m, blur = request_mask(mpath, painted, mblur)
                outs, paths, seed_used, t_used, i_used = generate(
                    pipe, img, text, limits, out_root, seed=sd, randomize_seed=rs, randomize_scales=rc,
                    name=os.path.basename(path), steps=n, resolution=res, sampler=smp, text_scale=ts,
                    image_scale=i_s, num_samples=k, mask=m, mask_blur=blur)
                return outs[0].image, paths, seed_used, t_used, i_used

            go.click(guard(run), [source, instruction, steps, resolution, sampler, seed, randomize_seed,
                                  text_scale, image_scale, randomize_scales, samples, mask_file, brush, mask_blur],
                     [result, downloads, seed, text_scale, image_scale])

        with gr.Tab("Multi-turn"):
            gr.Markdown("Each turn edits the turn you continue from (turn 0: the upload); click a turn "
                        "to continue from it. Continuing from an earlier turn drops the turns after it.")
            t_steps, t_res, t_sampler, t_seed, t_rand = common_inputs()
            with gr.Row():
                t_text_scale = gr.Number(value=pipe.default_text_scale, label="Text CFG")
                t_image_scale = gr.Number(value=1.5, label="Image CFG")
                from_turn = gr.Number(value=0, precision=0, label="Continue from turn", elem_id="from_turn")
            go_turn = gr.Button("Apply to that turn", variant="primary", elem_id="apply_turn")
            history = gr.State([])
            with gr.Row():
                turns_view = gr.Gallery(label="Turns", columns=4, elem_id="turns")
                turn_files = gr.File(label="Downloads: the last turn's PNG + settings (JSON)", file_count="multiple",
                                     interactive=False, elem_id="turn_downloads")

            def start(path):   # a new upload starts a new session
                if not path:
                    return [], [], 0
                h = [{"image": load_upload(path, limits), "settings": None, "files": []}]
                return h, session_gallery(h), 0

            def run_turn(path, hist, k, text, n, res, smp, sd, rs, ts, i_s, mpath, painted, mblur):
                if not hist and path:
                    hist = start(path)[0]
                m, blur = request_mask(mpath, painted, mblur)
                hist = continue_session(pipe, hist, k, text, limits, out_root, seed=sd, randomize_seed=rs,
                                        name=os.path.basename(path or "upload"), steps=n, resolution=res,
                                        sampler=smp, text_scale=ts, image_scale=i_s, mask=m, mask_blur=blur)
                return hist, session_gallery(hist), len(hist) - 1, hist[-1]["files"], hist[-1]["settings"]["seed"]

            def pick(evt: gr.SelectData):
                return evt.index

            source.change(guard(start), [source], [history, turns_view, from_turn])
            turns_view.select(pick, None, [from_turn])
            go_turn.click(guard(run_turn), [source, history, from_turn, instruction, t_steps, t_res, t_sampler,
                                            t_seed, t_rand, t_text_scale, t_image_scale, mask_file, brush,
                                            mask_blur],
                          [history, turns_view, from_turn, turn_files, t_seed])

        with gr.Tab("Guidance sweep"):
            gr.Markdown(f"A grid over text and image guidance scales (rows image scale, columns text "
                        f"scale), the same seed in every cell, one batched call; at most "
                        f"{limits.max_sweep_cells} cells.")
            w_steps, w_res, w_sampler, w_seed, w_rand = common_inputs()
            with gr.Row():
                text_scales = gr.Textbox(value="3, 5, 7.5, 10", label="Text scales", elem_id="text_scales")
                image_scales = gr.Textbox(value="1, 1.5, 2", label="Image scales", elem_id="image_scales")
            go_sweep = gr.Button("Sweep", variant="primary", elem_id="sweep")
            with gr.Row():
                grid = gr.Image(type="pil", label="Sweep", interactive=False, format="png", elem_id="grid")
                grid_files = gr.File(label="Downloads: grid PNG + settings (JSON)", file_count="multiple",
                                     interactive=False, elem_id="grid_downloads")

            def run_sweep(path, text, n, res, smp, sd, rs, tss, iss):
                img = load_upload(path, limits)
                g, paths, seed_used, _ = sweep(pipe, img, text, limits, out_root, text_scales=tss,
                                               image_scales=iss, seed=sd, randomize_seed=rs,
                                               name=os.path.basename(path), steps=n, resolution=res, sampler=smp)
                return g, paths, seed_used

            go_sweep.click(guard(run_sweep), [source, instruction, w_steps, w_res, w_sampler, w_seed, w_rand,
                                              text_scales, image_scales], [grid, grid_files, w_seed])

    ui.queue(max_size=limits.queue_size, default_concurrency_limit=limits.concurrency)
    ui.ip2p_out_root = out_root
    return ui


def launch(ui, limits: Limits, *, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           **kwargs):
    """Serve `ui` (blocks until stopped)."""
    return ui.launch(server_name=host, server_port=port, share=share, max_file_size=limits.max_file_size,
                     allowed_paths=[ui.ip2p_out_root], show_error=False, **kwargs)
