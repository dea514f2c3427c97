"""The authors' text format for the caption stage, and the rules that accept a completion.

A prompt is ``caption + "\\n##\\n"``; a completion is
``instruction + "\\n%%\\n" + edited caption + "\\nEND"`` (generation stops at
``"\\nEND"``, which is not part of the returned text).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Optional, Union

from .errors import CaptionStageError

PROMPT_SEPARATOR = "\n##\n"
EDIT_SEPARATOR = "\n%%\n"
STOP = "\nEND"

# Rejection reasons (stable strings: they are written to the rejected-captions file).
NO_SEPARATOR = "no_separator"
EXTRA_SEPARATOR = "extra_separator"
EMPTY_INSTRUCTION = "empty_instruction"
EMPTY_OUTPUT = "empty_output"
OUTPUT_EQUALS_INPUT = "output_equals_input"
BLOCKED_WORD = "blocked_word"
BLOCKED_INPUT = "blocked_input"


@dataclass(frozen=True)
class Rejection:
    reason: str  # one of the constants above
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.reason} ({self.detail})" if self.detail else self.reason


def format_prompt(caption: str) -> str:
    return caption + PROMPT_SEPARATOR


def format_completion(instruction: str, edited_caption: str) -> str:
    """The fine-tuning target, stop sequence included."""
    return instruction + EDIT_SEPARATOR + edited_caption + STOP


def cut_at_stop(text: str, stop: str = STOP) -> str:
    """The text before the first stop sequence (servers that ignore `stop` may return more)."""
    return text.split(stop, 1)[0]


def same_caption(a: str, b: str) -> bool:
    """The authors' test for "the edit changed nothing": equal up to case, outer
    whitespace and outer ``.!?``."""
    return a.strip().strip(".!?").lower() == b.strip().strip(".!?").lower()


class WordBlocklist:
    """Whole-word, case-insensitive matching of words or phrases.

    A crude local stand-in for the OpenAI moderation endpoint the authors called:
    it only catches what the list names.
    """

    def __init__(self, words: Iterable[str]):
        self.words = sorted({w.strip().lower() for w in words if w.strip()})
        alternatives = "|".join(re.escape(w) for w in sorted(self.words, key=len, reverse=True))
        self._pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE) if self.words else None

    @classmethod
    def from_file(cls, path: str) -> "WordBlocklist":
        """One word or phrase a line; blank lines and lines starting with '#' are ignored."""
        try:
            with open(path, encoding="utf-8") as f:
                return cls(line for line in f if not line.lstrip().startswith("#"))
        except OSError as e:
            raise CaptionStageError(f"cannot read blocklist {path}: {e.strerror}") from None

    def find(self, text: str) -> Optional[str]:
        """The first blocked word in `text`, or None."""
        if self._pattern is None:
            return None
        match = self._pattern.search(text)
        return match.group(0).lower() if match else None


def parse_completion(caption: str, completion: str,
                     blocklist: Optional[WordBlocklist] = None) -> Union[tuple[str, str], Rejection]:
    """(instruction, edited caption) from a model's completion of `format_prompt(caption)`,
    or the Rejection that says why it is unusable."""
    parts = cut_at_stop(completion).split(EDIT_SEPARATOR)
    if len(parts) < 2:
        return Rejection(NO_SEPARATOR)
    if len(parts) > 2:
        return Rejection(EXTRA_SEPARATOR, f"{len(parts) - 1} separators")
    instruction, edited = (p.strip() for p in parts)
    if not instruction:
        return Rejection(EMPTY_INSTRUCTION)
    if not edited:
        return Rejection(EMPTY_OUTPUT)
    if same_caption(caption, edited):
        return Rejection(OUTPUT_EQUALS_INPUT)
    if blocklist is not None:
        word = blocklist.find(instruction) or blocklist.find(edited)
        if word:
            return Rejection(BLOCKED_WORD, word)
    return instruction, edited
