"""An OpenAI-compatible completions endpoint (`POST {base_url}/completions`), standard library only.

Works with OpenAI itself and with servers that copy its API (vLLM, TGI,
llama.cpp's server). All prompts of a call go in one request as a list; a server that
refuses lists (a 400/422 answer, or the wrong number of choices) is asked one prompt per
request from then on.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from typing import Optional

from .backend import SamplingSettings
from .errors import BackendError
from .format import cut_at_stop

OPENAI_BASE_URL = "https://api.openai.com/v1"


def _is_retryable(status: int) -> bool:
    return status == 429 or status >= 500


def _error_message(body: bytes) -> str:
    """The server's own explanation: OpenAI's {"error": {"message": ...}} or the raw text."""
    try:
        error = json.loads(body).get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
    except (ValueError, AttributeError):
        pass
    return body.decode("utf-8", "replace").strip()[:500] or "(empty body)"


class _ClientError(BackendError):
    """A 4xx answer that retrying will not fix."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class _WrongChoiceCount(BackendError):
    """The answer does not hold one choice per prompt."""


class OpenAICompletionsBackend:
    """`generate(prompts, seed)` sends the seed as the request's `seed` (honoured by vLLM,
    llama.cpp and OpenAI on a best-effort basis). 429 and 5xx answers and network errors
    are retried with exponential backoff (or the server's Retry-After); any other error
    status raises BackendError at once."""

    def __init__(self, base_url: str, model: str, settings: SamplingSettings = SamplingSettings(),
                 api_key_env: str = "OPENAI_API_KEY", timeout: float = 300.0, max_retries: int = 5,
                 retry_wait: float = 1.0, max_retry_wait: float = 60.0):
        self.url = base_url.rstrip("/") + "/completions"
        self.model = model
        self.settings = settings
        self.api_key: Optional[str] = os.environ.get(api_key_env) or None
        if self.api_key is None and base_url.rstrip("/") == OPENAI_BASE_URL:
            raise BackendError(f"{OPENAI_BASE_URL} needs an API key: set ${api_key_env}")
        self.timeout, self.max_retries = timeout, max_retries
        self.retry_wait, self.max_retry_wait = retry_wait, max_retry_wait
        self.one_prompt_per_request = False  # set once the server has refused a list of prompts

    def request_body(self, prompts: list[str], seed: int) -> dict:
        s = self.settings
        prompt = prompts[0] if len(prompts) == 1 else list(prompts)  # a string suits every server
        return {"model": self.model, "prompt": prompt, "max_tokens": s.max_tokens,
                "temperature": s.temperature, "top_p": s.top_p,
                "frequency_penalty": s.frequency_penalty, "presence_penalty": s.presence_penalty,
                "stop": [s.stop], "n": 1, "seed": int(seed)}

    def generate(self, prompts: list[str], seed: int) -> list[str]:
        if not prompts:
            return []
        if len(prompts) > 1 and not self.one_prompt_per_request:
            try:
                return self._complete(prompts, seed)
            except _ClientError as e:
                if e.status not in (400, 422):
                    raise
            except _WrongChoiceCount:
                pass
            self.one_prompt_per_request = True
        return [text for p in prompts for text in self._complete([p], seed)]

    def _complete(self, prompts: list[str], seed: int) -> list[str]:
        response = self._post(self.request_body(prompts, seed))
        choices = response.get("choices") if isinstance(response, dict) else None
        if not isinstance(choices, list) or len(choices) != len(prompts):
            got = len(choices) if isinstance(choices, list) else "no"
            raise _WrongChoiceCount(f"{self.url}: expected {len(prompts)} choices, got {got}")
        try:
            ordered = sorted(choices, key=lambda c: c["index"])
            return [cut_at_stop(str(c["text"]), self.settings.stop) for c in ordered]
        except (KeyError, TypeError):
            raise BackendError(f"{self.url}: choices lack 'index' or 'text'") from None

    def _post(self, body: dict) -> dict:
        data = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        problem = ""
        for attempt in range(self.max_retries + 1):
            wait = min(self.retry_wait * 2 ** attempt, self.max_retry_wait)
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                    payload = answer.read()
                try:
                    return json.loads(payload)
                except ValueError:
                    raise BackendError(f"{self.url}: the answer is not JSON: {payload[:200]!r}") from None
            except urllib.error.HTTPError as e:
                message = _error_message(e.read())
                if not _is_retryable(e.code):
                    raise _ClientError(f"{self.url}: HTTP {e.code}: {message}", e.code) from None
                problem = f"HTTP {e.code}: {message}"
                retry_after = e.headers.get("Retry-After") if e.headers else None
                if retry_after and retry_after.strip().isdigit():
                    wait = min(float(retry_after), self.max_retry_wait)
            except (urllib.error.URLError, OSError) as e:  # refused, DNS, timeout, reset
                problem = f"cannot reach the server: {getattr(e, 'reason', e)}"
            if attempt < self.max_retries:
                time.sleep(wait)
        raise BackendError(f"{self.url}: {problem} (gave up after {self.max_retries + 1} attempts)")
