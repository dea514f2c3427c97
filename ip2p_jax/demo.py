"""`make demo` (`python -m ip2p_jax.demo`): edit the example images with the shipped demo model.

The demo model (``ip2p_jax/demo_model/``, a diffusers folder) is a small InstructPix2Pix
trained from nothing by this project (scripts/train_demo_model.sh) on the synthetic shapes
world: 64x64 scenes of 1-3 flat shapes (circle, square, triangle, star, diamond) in 8 colours
on a plain background, and six kinds of instruction (recolour, background, add, remove,
resize, change shape). It knows nothing else: for real photos use real InstructPix2Pix
weights (`ip2p edit --model timbrooks/instruct-pix2pix ...`).

    python -m ip2p_jax.demo [--out demo_out] [--steps 20] [--model DIR]

Writes one PNG per edit and ``demo_grid.png`` (rows: example images; columns: the input, then
one edit per instruction, labelled) into --out and prints where they are.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Optional

from PIL import Image, ImageDraw

from ip2p_jax import cpu_devices
from ip2p_jax.datagen.shapes import parse_caption, render
from ip2p_jax.datagen.shapes.world import Layout
from ip2p_jax.errors import Ip2pError
from ip2p_jax.pipeline import EditPipeline

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
DEMO_MODEL_DIR = os.path.join(PACKAGE_DIR, "demo_model")
DEMO_MODEL_ENV = "IP2P_JAX_DEMO_MODEL"
EXAMPLES_DIR = os.path.join(os.path.dirname(PACKAGE_DIR), "examples")
EXAMPLES_FILE = "examples.json"
CELL = 128          # grid cell side (the 64x64 images are shown 2x, nearest neighbour)
LABEL_HEIGHT = 30


class DemoError(Ip2pError):
    """The demo model or the examples are missing or damaged."""


def demo_model_path() -> str:
    """The demo model folder: $IP2P_JAX_DEMO_MODEL if set, else the one shipped in the package.
    Raises DemoError if it is not a complete diffusers folder."""
    path = os.environ.get(DEMO_MODEL_ENV) or DEMO_MODEL_DIR
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise DemoError(f"{path}: no demo model here (no model_index.json); rebuild it with "
                        f"scripts/train_demo_model.sh or pass --model")
    return path


# ----------------------------------------------------------------------------- examples

# (caption, layout seed, instructions): rendered by the shapes world, as the training pairs are.
EXAMPLE_SCENES = (
    ("a large red circle and a small blue square on a white background", 11,
     ("make the circle green", "make the background yellow", "remove the square", "make the square bigger")),
    ("a large yellow star and a large green triangle on a black background", 5,
     ("turn the triangle into a circle", "paint the star purple", "add a small white diamond",
      "change the background to blue")),
    ("a small orange diamond, a large purple square and a small white circle on a green background", 23,
     ("delete the purple square", "make the diamond red", "shrink the square", "make the background black")),
)


def write_examples(folder: str = EXAMPLES_DIR) -> str:
    """Render the example inputs (PNG) and write examples.json [{image, caption, instructions}]."""
    os.makedirs(folder, exist_ok=True)
    entries = []
    for i, (caption, seed, instructions) in enumerate(EXAMPLE_SCENES):
        name = f"shapes_{i}.png"
        render(Layout.from_seed(seed).place(parse_caption(caption))).save(os.path.join(folder, name))
        entries.append({"image": name, "caption": caption, "instructions": list(instructions)})
    path = os.path.join(folder, EXAMPLES_FILE)
    with open(path, "w") as f:
        json.dump(entries, f, indent=2)
    return path


def read_examples(folder: str = EXAMPLES_DIR) -> list[dict]:
    """[{image: absolute path, caption, instructions}] from <folder>/examples.json."""
    path = os.path.join(folder, EXAMPLES_FILE)
    try:
        with open(path) as f:
            entries = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DemoError(f"{path}: cannot read the demo examples ({e})") from None
    out = []
    for n, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("image"), str) or not e.get("instructions"):
            raise DemoError(f"{path}: entry {n} needs 'image' and a non-empty 'instructions' list")
        image = os.path.join(folder, e["image"])
        if not os.path.isfile(image):
            raise DemoError(f"{path}: entry {n}: no image {image}")
        out.append({"image": image, "caption": e.get("caption", ""), "instructions": list(e["instructions"])})
    return out


# ----------------------------------------------------------------------------- demo


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "edit"


def _label(draw, xy, text: str, width: int) -> None:
    """Draw text wrapped to two lines of at most ~width pixels (PIL's default bitmap font)."""
    words, lines, line = text.split(), [], ""
    for w in words:
        cand = f"{line} {w}".strip()
        if draw.textlength(cand) <= width - 4 or not line:
            line = cand
        else:
            lines.append(line)
            line = w
    lines.append(line)
    x, y = xy
    for k, ln in enumerate(lines[:2]):
        draw.text((x + 2, y + 2 + 12 * k), ln, fill=(0, 0, 0))


def make_grid(rows: list[tuple]) -> Image.Image:
    """rows: [(input PIL, [(instruction, edited PIL), ...])] -> one labelled grid image."""
    cols = 1 + max(len(r[1]) for r in rows)
    grid = Image.new("RGB", (cols * CELL, len(rows) * (CELL + LABEL_HEIGHT)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, (inp, edits) in enumerate(rows):
        y = r * (CELL + LABEL_HEIGHT)
        for c, (label, img) in enumerate([("input", inp)] + list(edits)):
            grid.paste(img.convert("RGB").resize((CELL, CELL), Image.NEAREST), (c * CELL, y))
            _label(draw, (c * CELL, y + CELL), label, CELL)
    return grid


def run_demo(out: str = "demo_out", model: Optional[str] = None, examples: str = EXAMPLES_DIR, steps: int = 20,
             seed: int = 0, text_scale: float = 7.5, image_scale: float = 1.5, progress: bool = True) -> dict:
    """Edit every example image with each of its instructions; returns {'grid': path, 'images': [...]}."""
    t0 = time.perf_counter()
    model = model or demo_model_path()
    if examples == EXAMPLES_DIR and not os.path.isfile(os.path.join(examples, EXAMPLES_FILE)):
        examples = os.path.join(out, "examples")     # installed without the repository: render them
        write_examples(examples)
    items = read_examples(examples)
    pipe = EditPipeline.from_pretrained(model)
    inputs = [Image.open(it["image"]).convert("RGB") for it in items]
    jobs = [(i, ins) for i, it in enumerate(items) for ins in it["instructions"]]
    result = pipe.edit([inputs[i] for i, _ in jobs], [ins for _, ins in jobs], steps=steps, seed=seed,
                       text_scale=text_scale, image_scale=image_scale, resolution=inputs[0].size[0],
                       resize="keep", batch_size=len(jobs), progress=progress)   # one compiled call
    os.makedirs(out, exist_ok=True)
    written, rows = [], [(img, []) for img in inputs]
    for (i, ins), img in zip(jobs, result.images):
        stem = os.path.splitext(os.path.basename(items[i]["image"]))[0]
        path = os.path.join(out, f"{stem}__{_slug(ins)}.png")
        img.save(path)
        written.append(path)
        rows[i][1].append((ins, img))
    grid_path = os.path.join(out, "demo_grid.png")
    make_grid(rows).save(grid_path)
    return {"grid": grid_path, "images": written, "model": model, "seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ip2p_jax.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--model", default=None, help="model folder (default: the shipped demo model)")
    p.add_argument("--examples", default=EXAMPLES_DIR, help=f"folder with {EXAMPLES_FILE} and its images")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write-examples", action="store_true", help="(re)render the example inputs and exit")
    args = p.parse_args(argv)
    try:
        if args.write_examples:
            print(f"wrote {write_examples(args.examples)}")
            return 0
        cpu_devices.use_every_core()
        model = args.model or demo_model_path()
        print(f"demo: editing the examples in {args.examples} with the demo model {model}\n"
              "      (it knows only the synthetic shapes world; for photos use real InstructPix2Pix weights: "
              "ip2p edit --model timbrooks/instruct-pix2pix ...)", flush=True)
        res = run_demo(args.out, model, args.examples, steps=args.steps, seed=args.seed)
    except Ip2pError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
    print(f"demo: {len(res['images'])} edits written to {os.path.abspath(args.out)}/")
    print(f"demo: side-by-side grid: {os.path.abspath(res['grid'])}  ({res['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
