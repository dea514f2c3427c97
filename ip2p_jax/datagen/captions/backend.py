"""The interface every language-model backend implements, and the authors' sampling settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .format import STOP


@dataclass(frozen=True)
class SamplingSettings:
    """Defaults are the authors' OpenAI Completion call (generate_txt_dataset.py)."""
    temperature: float = 0.7  # 0 means greedy
    top_p: float = 1.0
    max_tokens: int = 256
    frequency_penalty: float = 0.1
    presence_penalty: float = 0.0
    stop: str = STOP


class CompletionBackend(Protocol):
    def generate(self, prompts: list[str], seed: int) -> list[str]:
        """One completion per prompt, without the stop sequence. The same prompts and seed
        give the same completions on the same backend and hardware."""
        ...
