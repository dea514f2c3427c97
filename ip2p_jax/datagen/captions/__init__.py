"""The caption stage of InstructPix2Pix data generation (the text half).

A language model turns an input caption into an edit instruction and an edited
caption. Output lines are the authors' released format
``{"input": caption, "edit": instruction, "output": edited caption, "url": url}``,
which the image stage reads.

What follows the authors' dataset_creation/generate_txt_dataset.py and
prepare_for_gpt.py:
- prompt ``caption + "\\n##\\n"``; completion ``instruction + "\\n%%\\n" + edited
  caption``, generation stopped at ``"\\nEND"``; fine-tuning pairs
  ``{"prompt", "completion"}`` with the stop sequence at the end of the completion;
- sampling: temperature 0.7, top_p 1, frequency penalty 0.1, presence penalty 0,
  at most 256 new tokens, stop sequence matched in the generated text only;
- a completion is kept only if it splits into exactly two parts at
  ``"\\n%%\\n"`` and the edited caption differs from the input after
  ``strip().strip(".!?").lower()``; otherwise the caption is sampled again,
  up to 4 completions in all (1 + 3 retries);
- partitions: rows shuffled by ``np.random.seed(seed)``'s permutation, cut with
  ``np.array_split``; each partition appends to its own JSONL file and on
  restart skips captions and URLs already in it; ``num_samples`` counts per
  partition; an input caption or URL already used is skipped (deduplication).

Deviations:
- The fine-tuned GPT-3 is replaced by pluggable backends
  (``generate(prompts, seed) -> completions``): a local transformers causal LM
  (PyTorch: transformers has no JAX language models any more) or any
  OpenAI-compatible ``/v1/completions`` server. Completions are batched.
- OpenAI's moderation endpoint (on the input caption, and on instruction and
  edited caption) is replaced by an optional word blocklist: a crude stand-in
  that catches only the words it lists.
- Empty instructions or edited captions are rejected (the authors' check let
  them through); instruction and edited caption are stripped of outer
  whitespace; text after a stray ``"\\nEND"`` is cut even if a server ignored
  ``stop``.
- Output key ``input`` (the released files' name) instead of the script's
  ``caption``; resuming reads either.
- Captions given up on (blocked input, or no acceptable completion in 4
  tries) are recorded in ``<out>.rejected.jsonl`` with the reasons and are not
  retried after a restart (the authors' script retried them). A caption that
  repeats an in-flight or rejected one is skipped as a duplicate.
- Inputs are read from local files (text, JSONL, parquet), not from the
  Hugging Face hub; blank captions are skipped.
- Truncated completions (no stop within 256 tokens) are judged like any other,
  as the authors did; seeds make runs reproducible per backend and batch size,
  which the OpenAI API did not offer.
"""

from .backend import CompletionBackend, SamplingSettings
from .errors import BackendError, CaptionStageError
from .finetune import export_finetune, finetune_example
from .format import (EDIT_SEPARATOR, PROMPT_SEPARATOR, STOP, Rejection, WordBlocklist, cut_at_stop,
                     format_completion, format_prompt, parse_completion, same_caption)
from .http_backend import OpenAICompletionsBackend
from .sources import CaptionRow, read_captions, select_partition
from .stage import StageResult, derive_seed, rejected_path, run_caption_stage
from .store import JsonlAppender, recover_jsonl
from .transformers_backend import TransformersBackend


def make_backend(name: str, **kwargs) -> CompletionBackend:
    """"transformers" (kwargs of TransformersBackend; torch loads only then) or "openai" (of
    OpenAICompletionsBackend)."""
    if name == "transformers":
        return TransformersBackend(**kwargs)
    if name == "openai":
        return OpenAICompletionsBackend(**kwargs)
    raise CaptionStageError(f"unknown backend '{name}' (expected 'transformers' or 'openai')")
