"""A causal language model from a local transformers folder (PyTorch).

transformers 5 has no JAX/Flax language models any more, so this backend runs
PyTorch; it only writes text, nothing downstream depends on it.
"""

from __future__ import annotations

import os
from typing import Optional

from .backend import SamplingSettings
from .errors import BackendError


def _openai_penalties(prompt_length: int, frequency: float, presence: float):
    """A LogitsProcessor with OpenAI's penalties: every token's logit is lowered by
    ``frequency * count + presence * (count > 0)``, counting the tokens generated so far
    (the prompt does not count). Applied before temperature, like vLLM."""
    import torch  # optional heavy dependencies (this backend only)
    from transformers import LogitsProcessor

    class OpenAIPenalties(LogitsProcessor):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            generated = input_ids[:, prompt_length:]
            counts = torch.zeros_like(scores)
            counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
            return scores - frequency * counts - presence * (counts > 0).to(scores.dtype)

    return OpenAIPenalties()


def _stop_on_text(tokenizer, prompt_length: int, stop: str):
    """A StoppingCriteria that ends a row once its generated text (not the prompt)
    contains `stop`. Only a short tail is decoded each step."""
    import torch  # optional heavy dependencies (this backend only)
    from transformers import StoppingCriteria

    tail_tokens = 2 * len(stop) + 4  # every token decodes to >= 1 character, with margin

    class StopOnText(StoppingCriteria):
        def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
            start = max(prompt_length, input_ids.shape[1] - tail_tokens)
            tails = tokenizer.batch_decode(input_ids[:, start:], skip_special_tokens=True)
            return torch.tensor([stop in t for t in tails], device=input_ids.device)

    return StopOnText()


class TransformersBackend:
    """Batched sampling with left padding. `generate(prompts, seed)` seeds torch's RNG with
    `seed` (the global RNG state is restored afterwards), so a batch is reproducible."""

    def __init__(self, model_dir: str, settings: SamplingSettings = SamplingSettings(),
                 device: Optional[str] = None, dtype: Optional[str] = None):
        if not os.path.isdir(model_dir):
            raise BackendError(f"model folder {model_dir} does not exist")
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise BackendError(f"{model_dir} is not a transformers model folder (no config.json)")
        import torch  # optional heavy dependencies (this backend only)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.settings = settings
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
            self.model = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=getattr(torch, dtype) if dtype else "auto").to(self.device).eval()
        except (OSError, ValueError, KeyError) as e:
            raise BackendError(f"cannot load a causal language model from {model_dir}: {e}") from None
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise BackendError(f"{model_dir}: the tokenizer has neither a pad nor an eos token")
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def sampling_kwargs(self) -> dict:
        """Arguments to `model.generate` for the settings, naming everything the authors' API
        call fixed, so a folder's generation_config.json cannot change them."""
        s = self.settings
        kwargs = dict(max_new_tokens=s.max_tokens, pad_token_id=self.tokenizer.pad_token_id)
        if s.temperature == 0:
            return dict(kwargs, do_sample=False)
        return dict(kwargs, do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=0,
                    repetition_penalty=1.0)

    def generate(self, prompts: list[str], seed: int) -> list[str]:
        import torch  # optional heavy dependencies (this backend only)
        from transformers import LogitsProcessorList, StoppingCriteriaList

        s = self.settings
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True).to(self.device)
        prompt_length = batch["input_ids"].shape[1]
        processors = LogitsProcessorList()
        if s.frequency_penalty or s.presence_penalty:
            processors.append(_openai_penalties(prompt_length, s.frequency_penalty, s.presence_penalty))
        stopping = StoppingCriteriaList([_stop_on_text(self.tokenizer, prompt_length, s.stop)])
        cuda = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), torch.inference_mode():
            torch.manual_seed(seed)
            out = self.model.generate(**batch, **self.sampling_kwargs(), logits_processor=processors,
                                      stopping_criteria=stopping)
        texts = self.tokenizer.batch_decode(out[:, prompt_length:], skip_special_tokens=True)
        return [t.split(s.stop, 1)[0] for t in texts]
