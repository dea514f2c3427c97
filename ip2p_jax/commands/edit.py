"""`ip2p edit`: edit images from written instructions.

Every input image is edited with every --instruction (num-samples times each). Results go
to --out as PNG with a JSON sidecar of the settings used (seed included: rerunning with that
seed, one image and one sample reproduces the result). --grid writes instead, per image and
instruction, one labelled comparison grid over --text-scales x --image-scales (rows image
scale, columns text scale; the same seed in every cell).

Exit status: 0 when at least one result was written (unreadable inputs are reported on
stderr and skipped); 1 when nothing could be edited (every input failed); 2 for a usage
error (bad option, no model).
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import re
import sys

import jax

from ip2p_jax import demo, edit_job, files, images, masks, sharding
from ip2p_jax import turns as turnlib
from ip2p_jax.commands import distributed
from ip2p_jax.diffusion import check_names
from ip2p_jax.errors import Ip2pError
from ip2p_jax.edit_request import check_request, output_seeds, random_scales
from ip2p_jax.pipeline import PER_DEVICE_BATCH, EditPipeline
from ip2p_jax.progress import progress
from ip2p_jax.weights.lora import parse_lora_arg, read_lora


log = logging.getLogger(__name__)

DEFAULT_STEPS = 100        # the authors' default for real models
DEMO_STEPS = 20            # the demo model edits as well at 20 steps (its evaluation setting)


class EditUsageError(Ip2pError):
    """A bad combination of `ip2p edit` options, or no model to edit with."""


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = ("Exit status: 0 when at least one result was written (unreadable inputs are reported and "
                "skipped), 1 when nothing could be edited, 2 for a usage error.")

    p.add_argument("--model", help="diffusers folder, single checkpoint file or hub id (default: the demo model)")
    p.add_argument("--image", nargs="+", metavar="PATH",
                   help="image files, folders (their images) or glob patterns (decoded as their batch is reached)")
    p.add_argument("--instruction", action="append", metavar="TEXT",
                   help="the edit, e.g. 'make it winter' (repeat for several; '' returns the input)")
    p.add_argument("--then", action="append", metavar="TEXT",
                   help="a multi-turn session: apply TEXT to the previous turn's output (repeat for more "
                        "turns); writes NAME_turn1.png, NAME_turn2.png, ...")
    p.add_argument("--script", metavar="FILE.json",
                   help="a multi-turn session from a JSON list of turns: instructions or objects with "
                        "'instruction' and optional seed, text_scale, image_scale, steps, sampler, mask, mask_blur")
    p.add_argument("--mask", metavar="FILE",
                   help="edit only where this mask is white (black: kept; grey: partly; any size with the "
                        "image's aspect); one mask for every input")
    p.add_argument("--mask-blur", type=float, default=0.0, metavar="PX", help="feather the mask by PX pixels")
    p.add_argument("--manifest", metavar="FILE.jsonl",
                   help="dataset edit: one JSON object per line (image, instruction; optional seed, text_scale, "
                        "image_scale, id); writes OUT/<id>.png + .json, resumable; see docs/editing.md")
    p.add_argument("--tfds", metavar="DATA_DIR:NAME/SPLIT",
                   help="dataset edit of an edit-pairs TFDS split: its input images with its instructions")
    p.add_argument("--strict", action="store_true", help="dataset edit: stop at the first bad row")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="add a LoRA (diffusers / PEFT / kohya .safetensors, or a folder holding "
                        "pytorch_lora_weights.safetensors) at SCALE (default 1); repeat for several")
    p.add_argument("--steps", type=int, default=None,
                   help=f"sampler steps (default: {DEFAULT_STEPS}; {DEMO_STEPS} for the demo model)")
    p.add_argument("--text-scale", type=float, default=None,
                   help="text guidance scale (default: the model's, 7.5; 5.0 for SDXL editors)")
    p.add_argument("--image-scale", type=float, default=1.5, help="image guidance scale")
    p.add_argument("--guidance-rescale", type=float, default=0.0,
                   help="0..1: pull the guided prediction's std toward the instruction branch's (diffusers' "
                        "guidance_rescale; SDXL users try 0.7 against over-saturation); default 0: off")
    p.add_argument("--randomize-scales", action="store_true",
                   help="draw text scale from U[6, 9] and image scale from U[1.2, 1.8] per edit (as the authors' app)")
    p.add_argument("--seed", type=int, default=None, help="default: random (written to each sidecar)")
    p.add_argument("--sampler", default=None,
                   help="euler_a (default), euler, ddim, dpmpp_2m; edm_euler (EDM models such as CosXL: their default)")
    p.add_argument("--schedule", default=None,
                   help="kdiffusion (the authors'; default for euler/euler_a), diffusers, karras; ddim: diffusers "
                        "only; edm_euler: karras or exponential (default: the model's)")
    p.add_argument("--resolution", type=int, default=None,
                   help="long side for --resize authors (default: the model's native size: 512 for SD 1.5, "
                        "64 for the demo model)")
    p.add_argument("--resize", choices=images.RESIZE_MODES, default="authors",
                   help="authors: long side ~resolution, multiples of 64; keep: input size (floored to x8)")
    p.add_argument("--num-samples", type=int, default=1, help="results per image and instruction")
    p.add_argument("--batch-size", type=int, default=None, help="edits per compiled call (default: automatic)")
    p.add_argument("--grid", action="store_true", help="write a comparison grid over --text-scales x --image-scales")
    p.add_argument("--text-scales", type=_floats, default=[3.0, 5.0, 7.5, 10.0])
    p.add_argument("--image-scales", type=_floats, default=[1.0, 1.2, 1.5, 2.0])
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto: bf16 on GPU/TPU, fp32 on CPU")
    p.add_argument("--max-pixels", type=int, default=images.DEFAULT_MAX_PIXELS,
                   help="refuse input images with more pixels than this")
    p.add_argument("--max-edit-pixels", type=int, default=images.DEFAULT_MAX_EDIT_PIXELS,
                   help="refuse edits larger than this many pixels after resizing (checked before any compile)")
    p.add_argument("--compilation-cache", metavar="DIR", nargs="?", const="",
                   help="keep compiled edits on disk (default dir: $IP2P_JAX_COMPILATION_CACHE or ~/.cache/ip2p_jax/xla)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    distributed.add_arguments(p)


def find_demo_model() -> str | None:
    """The demo model shipped with the package (or named by $IP2P_JAX_DEMO_MODEL), if installed."""
    try:
        return demo.demo_model_path()
    except demo.DemoError:
        return None


def _slug(text: str, limit: int = 40) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return s[:limit].rstrip("-") or "input"


def write_result(directory: str, stem: str, image, settings: dict) -> str | None:
    """Write `image` as a PNG under a name no file in `directory` has (`stem.png`, `stem-1.png`, ...),
    claimed atomically, then its JSON sidecar; returns the PNG's path. Never overwrites.
    Multi-process (`--image` with the launch flags: every process receives every result): process 0 writes."""
    if jax.process_index() != 0:
        return None
    n = 0
    while True:
        path = os.path.join(directory, f"{stem}{'' if n == 0 else f'-{n}'}.png")
        side = path[:-4] + ".json"
        n += 1
        if os.path.lexists(side):
            continue
        try:
            with files.atomic_file(path, exclusive=True) as f:
                image.save(f, format="PNG")
            files.write_json(side, settings, exclusive=True)
        except FileExistsError:
            continue
        except OSError as e:   # full disk, folder gone or made read-only: earlier results stay complete
            raise files.OutputError(f"{path}: cannot write ({e.strerror or e}); the results written "
                                    f"before it in {directory} are complete") from None
        return path


def sidecar(name: str, model: str, settings: dict) -> dict:
    """The JSON sidecar of one result (`ip2p edit` and the web UI): its input, model and settings."""
    return {"input": os.path.abspath(name) if os.path.exists(name) else name, "model": model, **settings}


def sweep_grid(pipe, image, instruction: str, text_scales, image_scales, seed: int, *, name: str, **common):
    """(labelled grid, its sidecar settings, the cells' EditOutputs) for one image and instruction:
    rows image scale, columns text scale, the same seed in every cell, one batched call."""
    cells = [(i_s, t_s) for i_s in image_scales for t_s in text_scales]      # row-major: rows image scale
    res = pipe.edit([image] * len(cells), instruction, text_scale=[t for _, t in cells],
                    image_scale=[i for i, _ in cells], seed=[seed] * len(cells), names=[name] * len(cells),
                    progress=False, **common)
    n = len(text_scales)
    rows = [res.images[r * n:(r + 1) * n] for r in range(len(image_scales))]
    grid = images.make_grid(rows, [f"{v:g}" for v in image_scales], [f"{v:g}" for v in text_scales],
                            title=instruction, row_title="image scale", col_title="text scale")
    first = dict(res.settings[0])
    for k in ("text_scale", "image_scale", "index", "pair_index", "sample_index"):
        first.pop(k, None)
    settings = sidecar(name, pipe.source, {**first, "grid": {"rows_image_scale": list(image_scales),
                                                             "columns_text_scale": list(text_scales)}})
    return grid, settings, res.outputs


def _warn(msg: str) -> None:
    print(f"ip2p edit: {msg}", file=sys.stderr)


def choose_model(model: str | None) -> tuple[str, bool]:
    """(model, is_demo): `model` (--model) if given, else the installed demo model (the CLI and the app)."""
    if model:
        return model, False
    model = find_demo_model()
    if model is None:
        raise EditUsageError("no --model given and no demo model installed "
                             f"(pass --model PATH, or set ${demo.DEMO_MODEL_ENV})")
    return model, True


def default_steps(is_demo: bool) -> int:
    return DEMO_STEPS if is_demo else DEFAULT_STEPS


def run(args) -> int:
    distributed.init_distributed(args)   # before anything touches a JAX backend
    job = args.manifest is not None or args.tfds is not None
    if sum(x is not None for x in (args.image, args.manifest, args.tfds)) != 1:
        raise EditUsageError("give exactly one of --image, --manifest and --tfds")
    if job and (args.instruction or args.grid or args.num_samples != 1 or args.randomize_scales):
        raise EditUsageError("--manifest / --tfds rows carry their own instructions and seeds: --instruction, "
                             "--grid, --num-samples and --randomize-scales do not apply")
    sessions = bool(args.then or args.script)
    if args.script and args.instruction:
        raise EditUsageError("--script holds the session's instructions: --instruction and --then do not apply")
    if args.then and len(args.instruction or []) != 1:
        raise EditUsageError("--then continues one --instruction (a session: --instruction A --then B --then C)")
    if sessions and (job or args.grid or args.num_samples != 1 or args.randomize_scales):
        raise EditUsageError("a session (--then / --script) edits --image inputs, one result per turn: "
                             "--manifest, --tfds, --grid, --num-samples and --randomize-scales do not apply")
    if args.mask and job:
        raise EditUsageError("--mask applies to --image edits")
    if not job and not args.instruction and not args.script:
        raise EditUsageError("--image needs at least one --instruction")
    if args.strict and not job:
        raise EditUsageError("--strict applies to --manifest / --tfds")
    model, is_demo = choose_model(args.model)
    steps = args.steps if args.steps is not None else default_steps(is_demo)
    if steps < 1 or args.num_samples < 1 or (args.batch_size is not None and args.batch_size < 1):
        raise EditUsageError("--steps, --num-samples and --batch-size must be positive")
    check_request(steps=steps, num_samples=args.num_samples, batch_size=args.batch_size,
                  text_scale=[args.text_scale, *(args.text_scales if args.grid else [])],
                  image_scale=[args.image_scale, *(args.image_scales if args.grid else [])],
                  guidance_rescale=args.guidance_rescale)
    check_names(args.sampler, steps, args.schedule)   # unknown sampler / schedule: usage error, now
    if args.grid and (not args.text_scales or not args.image_scales):
        raise EditUsageError("--grid needs at least one --text-scales and one --image-scales value")
    mask = masks.load_mask(args.mask) if args.mask else None   # a bad mask or script: before the model loads
    masks.check_blur(args.mask_blur)
    turns = None
    if sessions:
        turns = (turnlib.read_script(args.script) if args.script
                 else turnlib.normalize([args.instruction[0], *args.then], "--then"))
        for t in turns:
            if isinstance(t.get("mask"), str):
                masks.load_mask(t["mask"])
    files.check_output_dir(args.out)   # a file, read-only or full --out is refused before the model loads
    if job:
        rows, bad = _job_rows(args)   # a bad manifest or dataset is reported before any model is loaded

    if args.compilation_cache is not None:
        sharding.enable_compilation_cache(args.compilation_cache or None)
    loras = [parse_lora_arg(x) for x in args.lora]
    for path, _ in loras:   # a missing or unreadable LoRA is refused before the model loads
        read_lora(path)
    pipe = EditPipeline.from_pretrained(model, dtype=None if args.dtype == "auto" else args.dtype)
    for path, scale in loras:
        log.info("LoRA %s at scale %g", path, scale)
        pipe.load_lora(path, scale)
    args.sampler = args.sampler or pipe.default_sampler
    pipe.plan(args.sampler, steps, args.schedule)   # a sampler this model cannot use: refused before any work
    resolution = args.resolution if args.resolution is not None else pipe.native_resolution
    log.info("using %s (%s); %d steps%s", model,
             "no --model given: the demo model, which knows only the synthetic shapes world" if is_demo
             else "--model", steps,
             f", resolution {resolution} (the model's native size; --resolution to change)"
             if args.resize == "authors" and args.resolution is None else "")
    if job:
        return _run_job(pipe, rows, bad, args, steps, resolution)

    # Check every input from its header before any compile (a bad one is reported and skipped, the
    # others go on); pixels are decoded only when their batch is reached.
    paths = images.expand_paths(args.image)
    ok, failed = [], []
    for path in paths:
        try:
            size = images.probe_size(path, max_pixels=args.max_pixels)
            images.edit_size(size, mode=args.resize, resolution=resolution, name=path,
                             max_edit_pixels=args.max_edit_pixels)
            if mask is not None:
                masks.check_aspect(mask.size, size, f"{args.mask} (for {path})")
            ok.append(path)
        except images.ImageError as e:
            failed.append(path)
            _warn(f"skipping {e}")
    if not ok:
        _warn(f"nothing to edit: none of the {len(paths)} input(s) can be edited")
        return 1

    created = not os.path.exists(args.out)
    os.makedirs(args.out, exist_ok=True)
    common = dict(steps=steps, sampler=args.sampler, schedule=args.schedule, resolution=resolution,
                  resize=args.resize, batch_size=args.batch_size, max_pixels=args.max_pixels,
                  max_edit_pixels=args.max_edit_pixels, guidance_rescale=args.guidance_rescale)
    try:
        run_fn = _run_sessions if turns else _run_grid if args.grid else _run_edits
        args.turns, args.mask_image = turns, mask
        n_written = run_fn(pipe, ok, args, common, failed)
    finally:
        if created and not os.listdir(args.out):   # a failed run leaves no empty folder behind
            os.rmdir(args.out)
    total_in = len(paths)
    summary = f"wrote {n_written} result(s) to {args.out}"
    if failed:
        summary += f"; {len(failed)} of {total_in} input(s) skipped: {', '.join(failed)}"
    _warn(summary) if failed else print(summary)
    return 0 if n_written else 1


def _job_rows(args):
    if args.manifest is None:
        return edit_job.tfds_rows(args.tfds, base_seed=args.seed or 0), []
    rows, bad = edit_job.read_manifest(args.manifest, base_seed=args.seed or 0)
    if args.strict and bad:
        raise edit_job.JobError(f"{args.manifest}: bad row (--strict): {bad[0]}")
    return rows, bad


def _run_job(pipe, rows, bad, args, steps, resolution) -> int:
    summary = edit_job.run_job(pipe, rows, args.out, steps=steps, sampler=args.sampler, schedule=args.schedule,
                               text_scale=args.text_scale, image_scale=args.image_scale, resolution=resolution,
                               resize=args.resize, bad=bad, strict=args.strict,
                               rows_are_local=args.tfds is not None, max_pixels=args.max_pixels,
                               max_edit_pixels=args.max_edit_pixels, show_progress=not args.quiet)
    done, skipped, n_failed = edit_job.total_summary(summary)   # each process has logged its own report
    if summary.process == 0:
        who = f"all {summary.processes} processes: " if summary.processes > 1 else ""
        print(f"{who}{done} done, {skipped} skipped, {n_failed} failed; results in {args.out}")
    return 0 if done + skipped else 1


def _load_resized(path: str, args, common, failed: list):
    """(input size, the image the model edits) of one input, or None (reported) if it cannot be read."""
    try:
        rgb = images.load_image(path, max_pixels=args.max_pixels)
    except images.ImageError as e:
        failed.append(path)
        _warn(f"skipping {e}")
        return None
    return rgb.size, images.resize_for_edit(rgb, mode=common["resize"], resolution=common["resolution"], name=path,
                                            max_edit_pixels=common["max_edit_pixels"])


def _run_edits(pipe, paths, args, common, failed) -> int:
    """Inputs are decoded a chunk at a time (one compiled call's worth), so memory does not grow
    with the number of inputs; seeds and random scales are those of one call over all of them."""
    texts = args.instruction
    n_pairs = len(paths) * len(texts)
    base = output_seeds(args.seed, 1, 1)[0][0]
    scales = random_scales(base, n_pairs) if args.randomize_scales else None
    per_call = common["batch_size"] or PER_DEVICE_BATCH * pipe.num_devices
    chunk_inputs = max(1, per_call // (len(texts) * args.num_samples))
    n = 0
    with progress(total=n_pairs * args.num_samples, desc="editing", unit="img", enabled=not args.quiet) as bar:
        for start in range(0, len(paths), chunk_inputs):
            loaded = [(i, p, _load_resized(p, args, common, failed))
                      for i, p in enumerate(paths[start:start + chunk_inputs], start)]
            pairs = [(i * len(texts) + t, p, got, text) for i, p, got in loaded if got is not None
                     for t, text in enumerate(texts)]
            if not pairs:
                continue
            kw = {}
            if scales is not None:
                kw = dict(text_scale=[scales[0][g] for g, *_ in pairs], image_scale=[scales[1][g] for g, *_ in pairs])
            if args.mask_image is not None:
                kw.update(mask=[_fitted_mask(args, got) for *_, got, _ in pairs], mask_blur=args.mask_blur)
            for out in pipe.iter_edit([got[1] for _, _, got, _ in pairs], [text for *_, text in pairs],
                                      text_scale=kw.pop("text_scale", args.text_scale),
                                      image_scale=kw.pop("image_scale", args.image_scale), **kw,
                                      seed=[base + g * args.num_samples for g, *_ in pairs],
                                      num_samples=args.num_samples, names=[p for _, p, _, _ in pairs], **common):
                g, path, got, text = pairs[out.settings["pair_index"]]
                settings = dict(out.settings, index=g * args.num_samples + out.settings["sample_index"],
                                pair_index=g, input_size=list(got[0]))
                if scales is not None:
                    settings["randomized_scales"] = True
                if args.mask_image is not None:
                    settings["mask"] = args.mask
                stem = f"{os.path.splitext(os.path.basename(path))[0]}_{_slug(text)}_{settings['seed']}"
                write_result(args.out, stem, out.image, sidecar(path, pipe.source, settings))
                n += 1
                bar.update(1)
            loaded = pairs = got = None   # drop this chunk's images before the next is decoded
    return n


def _run_grid(pipe, paths, args, common, failed) -> int:
    n = 0
    jobs = [(path, text) for path in paths for text in args.instruction]
    img = last = None
    for path, text in progress(jobs, desc="grids", unit="grid", enabled=not args.quiet):
        if path != last:   # one input decoded at a time
            got, last = _load_resized(path, args, common, failed), path
            in_size, img = got if got else (None, None)
        if img is None:
            continue
        seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2 ** 31)
        extra = {}
        if args.mask_image is not None:
            extra = dict(mask=_fitted_mask(args, (in_size, img)), mask_blur=args.mask_blur)
        grid, settings, _ = sweep_grid(pipe, img, text, args.text_scales, args.image_scales, seed,
                                       name=path, **common, **extra)
        if extra:
            settings["mask"] = args.mask
        settings["input_size"] = list(in_size)
        stem = f"{os.path.splitext(os.path.basename(path))[0]}_{_slug(text)}_{seed}_grid"
        write_result(args.out, stem, grid, settings)
        n += 1
    return n


def _fitted_mask(args, got):
    """--mask for one input ((input size, resized image)), resized as that image was."""
    in_size, img = got
    return masks.fit_mask(args.mask_image, in_size, img.size, mode=args.resize, name=args.mask)


def _run_sessions(pipe, paths, args, common, failed) -> int:
    """--then / --script: every input's session advances one turn per batched call; turn t of
    input g gets the seed S + g * turns + t. Writes NAME_turn1.png ... with sidecars."""
    turns = args.turns
    base = output_seeds(args.seed, 1, 1)[0][0]
    per_call = common["batch_size"] or PER_DEVICE_BATCH * pipe.num_devices
    n = 0
    with progress(total=len(paths) * len(turns), desc="turns", unit="img", enabled=not args.quiet) as bar:
        for start in range(0, len(paths), per_call):
            loaded = []
            for g, path in enumerate(paths[start:start + per_call], start):
                try:
                    loaded.append((g, path, images.load_image(path, max_pixels=args.max_pixels)))
                except images.ImageError as e:
                    failed.append(path)
                    _warn(f"skipping {e}")
            if not loaded:
                continue
            results = pipe.edit_sequence([im for *_, im in loaded], turns,
                                         seed=[base + g * len(turns) for g, *_ in loaded],
                                         names=[p for _, p, _ in loaded], mask=args.mask, mask_blur=args.mask_blur,
                                         text_scale=args.text_scale, image_scale=args.image_scale, **common)
            for t, res in enumerate(results):
                for (g, path, _), out in zip(loaded, res.outputs):
                    stem = f"{os.path.splitext(os.path.basename(path))[0]}_turn{t + 1}"
                    write_result(args.out, stem, out.image, sidecar(path, pipe.source, out.settings))
                    n += 1
                    bar.update(1)
            loaded = results = None
    return n
