#!/usr/bin/env python
"""MagicBrush's evaluation: L1, L2, CLIP-I and CLIP-T of edited outputs against the targets, per turn.

  ip2p edit --model M --tfds ~/tfds:magicbrush_dev/test --out edits/          # OUT/<split>-<i>.png
  python scripts/evaluate_magicbrush.py --tfds ~/tfds --tfds-name magicbrush_dev --split test \\
      --outputs edits/ --clip clip-vit-base-patch32 [--captions global_descriptions.json] --out results.json

The dataset is a built TFDS edit-pairs dataset (scripts/build_tfds.py --format magicbrush; any
edit-pairs dataset works, its records then count as turn 1). Record i of a split is scored with
OUTPUTS/<split>-<i>.png, the name `ip2p edit --tfds` gives it (`--split all`: every split).
Metrics (ip2p_jax.metrics.magicbrush): l1, l2 (pixels in [0, 1], the output resized to the
target's size), clip_i (output vs target image), clip_t (output vs the target's caption: from
--captions, MagicBrush's {img_id: {"<...>output<turn>.png": caption}} file, else the record's
edited caption, else the instruction; each turn records which). Prints and writes (atomically)
one JSON object: means over all turns, over each session's final turn and per turn index, plus
every turn's scores. Bad inputs: one error line, exit status 2.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ip2p_jax.errors import Ip2pError  # noqa: E402  (after the path set-up above)

PROG = "evaluate_magicbrush"


class EvalInputError(Ip2pError):
    """A dataset, output folder or captions file that cannot be used; the message names it."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--tfds", required=True, help="built TFDS edit-pairs data dir (with --tfds-name) or version folder")
    p.add_argument("--tfds-name", default=None, help="dataset name under --tfds")
    p.add_argument("--split", default="test", help="split to score, or 'all' (default: test)")
    p.add_argument("--outputs", required=True, help="folder of edited outputs <split>-<i>.png")
    p.add_argument("--clip", required=True, help="transformers CLIPModel folder (MagicBrush: clip-vit-base-patch32)")
    p.add_argument("--captions", default=None, help="MagicBrush global_descriptions.json (target captions)")
    p.add_argument("--clip-batch-size", type=int, default=32)
    p.add_argument("--out", default=None, help="JSON file for the results (default: print only)")
    args = p.parse_args(argv)
    if args.clip_batch_size < 1:
        p.error("--clip-batch-size must be >= 1")
    return args


def _text(v) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def read_captions(path: str) -> dict:
    """{img_id: {turn: caption}} from MagicBrush's {img_id: {"<name>output<turn>.png": caption}}."""
    from ip2p_jax.weights.io import read_json

    data = read_json(path)
    if not isinstance(data, dict):
        raise EvalInputError(f"{path}: expected a JSON object {{img_id: {{file name: caption}}}}")
    out = {}
    for img_id, entries in data.items():
        if not isinstance(entries, dict):
            raise EvalInputError(f"{path}: entry {img_id!r} is not an object of file name -> caption")
        for name, caption in entries.items():
            if (m := re.search(r"output(\d+)\.\w+$", name)) and isinstance(caption, str):
                out.setdefault(str(img_id), {})[int(m.group(1))] = caption
    return out


def read_turns(args) -> list[dict]:
    """Every scored turn: split, index, session, turn, target (PIL), output (PIL), text, text source."""
    from PIL import Image

    from ip2p_jax import images as imlib
    from ip2p_jax.data.builder import encoded_source, open_dataset

    builder = open_dataset(args.tfds, args.tfds_name)
    where = builder.data_dir
    splits = sorted(builder.info.splits) if args.split == "all" else [args.split]
    missing = [s for s in splits if s not in builder.info.splits]
    if missing:
        raise EvalInputError(f"{where}: no split {missing[0]!r} (it has: {', '.join(sorted(builder.info.splits))})")
    if not os.path.isdir(args.outputs):
        raise EvalInputError(f"--outputs {args.outputs}: not a folder")
    captions = read_captions(args.captions) if args.captions else {}
    sessions = "turn_index" in builder.info.features
    turns = []
    for split in splits:
        records = encoded_source(builder, split)
        for i in range(len(records)):
            rec = records[i]
            session, turn = _text(rec["prompt_id"]), int(rec["turn_index"]) if sessions else 1
            name = f"{split}-{i}"
            out_path = os.path.join(args.outputs, f"{name}.png")
            if not os.path.isfile(out_path):
                raise EvalInputError(f"{out_path}: missing (the output of {where} {split} record {i}, "
                                     f"{_text(rec['id'])}; edit the split with `ip2p edit --tfds`)")
            try:
                target = imlib.to_rgb(Image.open(io.BytesIO(rec["edited_image"])), name=f"{name} target")
            except OSError as e:
                raise EvalInputError(f"{where}: {split} record {i}: cannot decode the target image ({e})") from None
            caption = captions.get(session, {}).get(turn) or _text(rec["edited_caption"]).strip()
            text, source = (caption, "caption") if caption else (_text(rec["instruction"]), "instruction")
            turns.append({"split": split, "index": i, "id": _text(rec["id"]), "session": session, "turn": turn,
                          "target": target, "output": imlib.load_image(out_path), "text": text,
                          "text_source": source})
    if not turns:
        raise EvalInputError(f"{where}: split {args.split!r} has no records")
    return turns


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        turns = read_turns(args)
        from ip2p_jax import files
        from ip2p_jax.metrics import magicbrush
        from ip2p_jax.metrics.clip_scores import ClipScorer

        scorer = ClipScorer.from_pretrained(args.clip, batch_size=args.clip_batch_size)
        scores = magicbrush.turn_scores(scorer, [t["output"] for t in turns], [t["target"] for t in turns],
                                        [t["text"] for t in turns])
        summary = magicbrush.summarize(scores, [t["session"] for t in turns], [t["turn"] for t in turns])
        per_turn = [{**{k: t[k] for k in ("split", "index", "id", "session", "turn", "text_source")},
                     **{m: float(scores[m][n]) for m in magicbrush.METRICS}} for n, t in enumerate(turns)]
        result = {**summary, "settings": {"dataset": args.tfds, "name": args.tfds_name, "split": args.split,
                                          "outputs": args.outputs, "clip": args.clip, "captions": args.captions},
                  "per_turn": per_turn}
        if args.out:
            files.write_json(args.out, result)
    except (Ip2pError, OSError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in result.items() if k != "per_turn"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
