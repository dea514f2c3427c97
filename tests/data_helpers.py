"""Tiny edit-pair sources in the three formats, made inside tests (no downloads).

Each writer returns {example id: expected example dict} using the ids the builder gives.
"""
from __future__ import annotations

import importlib.util
import io
import json
import os

import numpy as np
from PIL import Image

import tiny


def encode(array: np.ndarray, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def image_bytes(seed: int, size: int = 32, fmt: str = "JPEG") -> bytes:
    return encode(tiny.random_image(size, size, seed), fmt)


def prompt_texts(i: int) -> dict:
    return {"input_caption": f"a photo of dog {i}", "instruction": f"make it winter {i}",
            "edited_caption": f"a photo of dog {i} in winter"}


def write_authors(root: str, n_prompts: int = 12, seeds: tuple = (3, 7), size: int = 32,
                  with_index: bool = True) -> dict:
    os.makedirs(root, exist_ok=True)
    expected, index = {}, []
    for p in range(n_prompts):
        name = f"{p:07d}"
        d = os.path.join(root, name)
        os.makedirs(d)
        t = prompt_texts(p)
        with open(os.path.join(d, "prompt.json"), "w") as f:
            json.dump({"input": t["input_caption"], "edit": t["instruction"], "output": t["edited_caption"],
                       "url": "http://x"}, f)
        ps = [s + 100 * p for s in seeds]
        for s in ps:
            a, b = image_bytes(2 * s, size), image_bytes(2 * s + 1, size)
            with open(os.path.join(d, f"{s}_0.jpg"), "wb") as f:
                f.write(a)
            with open(os.path.join(d, f"{s}_1.jpg"), "wb") as f:
                f.write(b)
            expected[f"{name}/{s}"] = dict(t, prompt_id=name, input_image=a, edited_image=b)
        index.append([name, ps])
    if with_index:
        with open(os.path.join(root, "seeds.json"), "w") as f:
            json.dump(index, f)
    return expected


def write_parquet(root: str, n_files: int = 2, rows: int = 10, layout: str = "hf", size: int = 32) -> dict:
    """layout 'hf': the Hugging Face columns with {bytes, path} structs; 'diffusers': input_image,
    edit_prompt, edited_image as plain binary columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(root, exist_ok=True)
    expected = {}
    for k in range(n_files):
        cols = {c: [] for c in ("original_prompt", "original_image", "edit_prompt", "edited_prompt", "edited_image")}
        for r in range(rows):
            i = k * rows + r
            t = prompt_texts(i // 2)  # two rows ("seeds") per prompt
            a, b = image_bytes(1000 + 2 * i, size), image_bytes(1001 + 2 * i, size, "PNG")
            cols["original_prompt"].append(t["input_caption"])
            cols["edit_prompt"].append(t["instruction"])
            cols["edited_prompt"].append(t["edited_caption"])
            if layout == "hf":
                cols["original_image"].append({"bytes": a, "path": f"{i}_0.jpg"})
                cols["edited_image"].append({"bytes": b, "path": f"{i}_1.png"})
            else:
                cols["original_image"].append(a)
                cols["edited_image"].append(b)
            if layout == "diffusers":
                t = {"instruction": t["instruction"], "input_caption": "", "edited_caption": ""}
            expected[f"part-{k}.parquet#{r}"] = dict(t, input_image=a, edited_image=b)
        if layout == "diffusers":
            table = pa.table({"input_image": pa.array(cols["original_image"], pa.binary()),
                              "edit_prompt": cols["edit_prompt"],
                              "edited_image": pa.array(cols["edited_image"], pa.binary())})
        else:
            table = pa.table(cols)
        pq.write_table(table, os.path.join(root, f"part-{k}.parquet"), row_group_size=4)
    return expected


def write_jsonl(root: str, n: int = 16, size: int = 32, name: str = "pairs.jsonl") -> dict:
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    expected, lines = {}, []
    for i in range(n):
        t = prompt_texts(i)
        a, b = image_bytes(5000 + 2 * i, size, "PNG"), image_bytes(5001 + 2 * i, size)
        with open(os.path.join(root, "img", f"{i}_in.png"), "wb") as f:
            f.write(a)
        with open(os.path.join(root, "img", f"{i}_out.jpg"), "wb") as f:
            f.write(b)
        obj = {"input_image": f"img/{i}_in.png", "edited_image": f"img/{i}_out.jpg", "instruction": t["instruction"]}
        if i % 2 == 0:  # captions are optional
            obj.update(input_caption=t["input_caption"], edited_caption=t["edited_caption"])
        else:
            t = dict(t, input_caption="", edited_caption="")
        lines.append(json.dumps(obj))
        expected[f"{name}:{i + 1}"] = dict(t, prompt_id=f"img/{i}_in.png", input_image=a, edited_image=b)
    with open(os.path.join(root, name), "w") as f:
        f.write("\n".join(lines) + "\n")
    return expected


def read_split(builder, split: str) -> list[dict]:
    """All records of a split, images as the stored encoded bytes, texts as str."""
    import tensorflow_datasets as tfds

    ds = builder.as_data_source(split, decoders={"input_image": tfds.decode.SkipDecoding(),
                                                 "edited_image": tfds.decode.SkipDecoding()})
    out = []
    for i in range(len(ds)):
        ex = ds[i]
        out.append({k: (v.decode() if k not in ("input_image", "edited_image") else v) for k, v in ex.items()})
    return out


def fast_tokenizer_file(tok, path) -> str:
    """The tokenizer as FastTokenizer arguments in a JSON file (subprocesses skip transformers)."""
    with open(path, "w") as f:
        json.dump([tok.backend_tokenizer.to_str(), tok.pad_token_id, tok.eos_token_id], f)
    return str(path)


def build_tfds_script():
    """scripts/build_tfds.py as a module (its main(argv) is the CLI)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "build_tfds.py")
    spec = importlib.util.spec_from_file_location("build_tfds", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script
