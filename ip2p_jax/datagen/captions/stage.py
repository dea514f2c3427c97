"""The caption stage's loop: captions in, {input, edit, output, url} lines out, resumable.

Per partition there is one output file of accepted edits and one
``.rejected.jsonl`` file of captions given up on. On start both are recovered
(`store.recover_jsonl`): their captions and URLs count as done and are
skipped, so a killed run continues where it stopped without duplicates.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np

from ip2p_jax.progress import progress as progress_bar

from .backend import CompletionBackend
from .errors import BackendError, CaptionStageError
from .format import BLOCKED_INPUT, Rejection, WordBlocklist, format_prompt, parse_completion
from .sources import CaptionRow
from .store import JsonlAppender, recover_jsonl


def rejected_path(out_path: str) -> str:
    """Where the captions given up on are kept: `x.jsonl` -> `x.rejected.jsonl`."""
    stem = out_path[:-len(".jsonl")] if out_path.endswith(".jsonl") else out_path
    return stem + ".rejected.jsonl"


def derive_seed(*keys: int) -> int:
    """A 32-bit seed that depends on every key (seed, partition, resume point, call number)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


@dataclass
class StageResult:
    written: int = 0         # accepted edits in the output file, earlier runs included
    new: int = 0             # accepted by this run
    given_up: int = 0        # captions this run rejected for good (input blocked or out of attempts)
    duplicates: int = 0      # rows skipped because their caption or URL was done or in progress
    calls: int = 0           # backend calls
    rejections: Counter = field(default_factory=Counter)  # every rejected completion, by reason


@dataclass
class _Pending:
    row: CaptionRow
    reasons: list = field(default_factory=list)


class _DoneSet:
    """Captions and URLs already handled (written, given up on, or in flight)."""

    def __init__(self):
        self.captions: set = set()
        self.urls: set = set()

    def has(self, row: CaptionRow) -> bool:
        return row.caption in self.captions or (row.url != "" and row.url in self.urls)

    def add(self, caption: str, url: str) -> None:
        self.captions.add(caption)
        if url:
            self.urls.add(url)


def run_caption_stage(rows: Iterable[CaptionRow], backend: CompletionBackend, out_path: str, *,
                      num_samples: int, batch_size: int = 8, seed: int = 0, stream: int = 0,
                      max_attempts: int = 4, blocklist: Optional[WordBlocklist] = None,
                      progress: bool = True) -> StageResult:
    """Write up to `num_samples` accepted edits for this partition to `out_path` (counting the
    ones already there). A caption gets up to `max_attempts` completions (the authors: 1 + 3
    retries); the first acceptable one is kept. `stream` (e.g. the partition index) keeps
    the seeds of parallel runs with the same `seed` apart."""
    if num_samples < 1 or batch_size < 1 or max_attempts < 1:
        raise CaptionStageError("num_samples, batch_size and max_attempts must be >= 1")
    done = _DoneSet()
    accepted = recover_jsonl(out_path)
    for record in accepted:
        # files written by the authors' own script use "caption" for "input"
        done.add(record.get("input", record.get("caption", "")), record.get("url", ""))
    for record in recover_jsonl(rejected_path(out_path)):
        done.add(record.get("input", ""), record.get("url", ""))
    result = StageResult(written=len(accepted))
    resume_point = len(done.captions)  # keeps seeds after a restart apart from the first run's

    fresh = iter(rows)
    retries: deque = deque()
    with JsonlAppender(out_path) as out, JsonlAppender(rejected_path(out_path)) as rejected, \
            progress_bar(total=num_samples, initial=min(result.written, num_samples), desc="caption edits",
                         unit="edit", enabled=progress) as bar:

        def give_up(item: _Pending) -> None:
            rejected.write({"input": item.row.caption, "url": item.row.url, "reasons": item.reasons})
            result.given_up += 1

        def next_batch(size: int) -> list:
            batch = [retries.popleft() for _ in range(min(size, len(retries)))]
            while len(batch) < size:
                row = next(fresh, None)
                if row is None:
                    break
                if done.has(row):
                    result.duplicates += 1
                    continue
                done.add(row.caption, row.url)
                word = blocklist.find(row.caption) if blocklist is not None else None
                if word:
                    give_up(_Pending(row, [str(Rejection(BLOCKED_INPUT, word))]))
                    continue
                batch.append(_Pending(row))
            return batch

        while result.written < num_samples:
            # never ask for more than could still be accepted: each caption yields at most one edit
            batch = next_batch(min(batch_size, num_samples - result.written))
            if not batch:
                break  # captions exhausted
            completions = backend.generate([format_prompt(p.row.caption) for p in batch],
                                           seed=derive_seed(seed, stream, resume_point, result.calls))
            result.calls += 1
            if len(completions) != len(batch):
                raise BackendError(f"the backend returned {len(completions)} completions for {len(batch)} prompts")
            for item, completion in zip(batch, completions):
                parsed = parse_completion(item.row.caption, completion, blocklist)
                if isinstance(parsed, Rejection):
                    result.rejections[parsed.reason] += 1
                    item.reasons.append(str(parsed))
                    if len(item.reasons) < max_attempts:
                        retries.append(item)
                    else:
                        give_up(item)
                    continue
                instruction, edited = parsed
                out.write({"input": item.row.caption, "edit": instruction, "output": edited,
                           "url": item.row.url})
                result.written += 1
                result.new += 1
                bar.update()
            bar.set_postfix_str(f"rejected={sum(result.rejections.values())}", refresh=False)
    return result
