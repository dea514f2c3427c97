"""Human-written examples -> prompt/completion JSONL for fine-tuning a language model.

Input lines: ``{"input": caption, "edit": instruction, "output": edited caption, ...}``
(the authors' human-written-prompts.jsonl). Output lines:
``{"prompt": caption + "\\n##\\n", "completion": instruction + "\\n%%\\n" + edited + "\\nEND"}``,
the format the authors fine-tuned GPT-3 with.
"""

from __future__ import annotations

import json
import os

from ip2p_jax import jsonl

from .errors import CaptionStageError
from .format import EDIT_SEPARATOR, PROMPT_SEPARATOR, STOP, format_completion, format_prompt

REQUIRED_KEYS = ("input", "edit", "output")


def finetune_example(record: dict, where: str) -> dict:
    """One prompt/completion pair; `where` ("file:line") names the item in errors."""
    for key in REQUIRED_KEYS:
        value = record.get(key)
        if not isinstance(value, str) or not value.strip():
            raise CaptionStageError(f"{where}: '{key}' must be a non-empty string, got {value!r}")
        for marker in (PROMPT_SEPARATOR, EDIT_SEPARATOR, STOP):
            if marker in value:
                raise CaptionStageError(f"{where}: '{key}' contains the separator {marker!r}, "
                                        "which would make the completion unparseable")
    return {"prompt": format_prompt(record["input"]),
            "completion": format_completion(record["edit"], record["output"])}


def export_finetune(human_path: str, out_path: str) -> int:
    """Convert every line of `human_path`; the output file appears only when all lines are valid.
    Returns the number of examples written."""
    if not os.path.isfile(human_path):
        raise CaptionStageError(f"human-written examples file {human_path} does not exist")
    examples = []
    with open(human_path, encoding="utf-8") as f:
        for number, record in jsonl.objects(f, human_path, CaptionStageError):
            examples.append(finetune_example(record, f"{human_path}:{number}"))
    if not examples:
        raise CaptionStageError(f"{human_path} holds no examples")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = f"{out_path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(e) + "\n" for e in examples)
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return len(examples)
