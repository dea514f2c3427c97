"""Caption stage (ip2p_jax/datagen/captions): format, filters, inputs, resumable writing,
the transformers backend against transformers' own `generate`, the HTTP backend against a
local stub server, and the CLI's exit codes."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from ip2p_jax.datagen import captions as cap
from ip2p_jax.datagen.captions import format as fmt

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import generate_captions  # noqa: E402

# ---------------------------------------------------------------------------- format and filters


def test_prompt_and_completion_are_the_authors_format():
    assert cap.format_prompt("a cat on a mat") == "a cat on a mat\n##\n"
    assert cap.format_completion("make it red", "a red cat") == "make it red\n%%\na red cat\nEND"


BLOCK = cap.WordBlocklist(["gore", "blood bath"])

PARSE_TABLE = [
    ("a cat", "make it red\n%%\na red cat", ("make it red", "a red cat")),
    ("a cat", " make it red \n%%\n a red cat ", ("make it red", "a red cat")),
    ("a cat", "make it red\n%%\na red cat\nEND\nanother\n%%\nline", ("make it red", "a red cat")),
    ("a cat, sitting", "remove the comma\n%%\na cat sitting", ("remove the comma", "a cat sitting")),
    ("a cat", "make it red a red cat", fmt.NO_SEPARATOR),
    ("a cat", "make it red\n%% a red cat", fmt.NO_SEPARATOR),
    ("a cat", "", fmt.NO_SEPARATOR),
    ("a cat", "a\n%%\nb\n%%\nc", fmt.EXTRA_SEPARATOR),
    ("a cat", "  \n%%\na red cat", fmt.EMPTY_INSTRUCTION),
    ("a cat", "make it red\n%%\n  ", fmt.EMPTY_OUTPUT),
    ("A cat.", "do nothing\n%%\n a CAT!? ", fmt.OUTPUT_EQUALS_INPUT),
    ("a cat", "add gore\n%%\na cat in a pool", fmt.BLOCKED_WORD),
    ("a cat", "make it messy\n%%\na cat in a Blood  Bath", ("make it messy", "a cat in a Blood  Bath")),
    ("a cat", "make it messy\n%%\na cat in a Blood Bath", fmt.BLOCKED_WORD),
    ("a cat", "add gorex\n%%\na gorex cat", ("add gorex", "a gorex cat")),
]


@pytest.mark.parametrize("caption,completion,expected", PARSE_TABLE)
def test_parse_completion(caption, completion, expected):
    result = cap.parse_completion(caption, completion, BLOCK)
    if isinstance(expected, tuple):
        assert result == expected
    else:
        assert isinstance(result, cap.Rejection) and result.reason == expected


def test_blocklist_file(tmp_path):
    path = tmp_path / "block.txt"
    path.write_text("# comment\n\nNSFW\nbad word\n")
    block = cap.WordBlocklist.from_file(str(path))
    assert block.words == ["bad word", "nsfw"]
    assert block.find("an nsfw-ish photo") == "nsfw"
    assert block.find("a BAD WORD here") == "bad word"
    assert block.find("badword, nsfwx") is None
    with pytest.raises(cap.CaptionStageError, match="missing.txt"):
        cap.WordBlocklist.from_file(str(tmp_path / "missing.txt"))


# ---------------------------------------------------------------------------- fine-tuning export


def test_export_finetune(tmp_path):
    human = tmp_path / "human.jsonl"
    lines = [{"input": "a dog", "edit": "make it a cat", "output": "a cat", "url": "u1"},
             {"input": "a house", "edit": "add snow", "output": "a house in snow"}]
    human.write_text("".join(json.dumps(r) + "\n" for r in lines) + "\n")
    out = tmp_path / "out" / "ft.jsonl"
    assert cap.export_finetune(str(human), str(out)) == 2
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert got == [{"prompt": "a dog\n##\n", "completion": "make it a cat\n%%\na cat\nEND"},
                   {"prompt": "a house\n##\n", "completion": "add snow\n%%\na house in snow\nEND"}]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(lines[0]) + "\n" + json.dumps({"input": "x", "edit": ""}) + "\n")
    with pytest.raises(cap.CaptionStageError, match=r"bad.jsonl:2: 'edit'"):
        cap.export_finetune(str(bad), str(tmp_path / "never.jsonl"))
    bad.write_text(json.dumps({"input": "x", "edit": "a\n%%\nb", "output": "y"}) + "\n")
    with pytest.raises(cap.CaptionStageError, match="separator"):
        cap.export_finetune(str(bad), str(tmp_path / "never.jsonl"))
    assert not (tmp_path / "never.jsonl").exists()


# ---------------------------------------------------------------------------- input captions


def test_read_captions_formats(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    txt = tmp_path / "c.txt"
    txt.write_text("a cat\n\n  \na dog\r\n")
    assert cap.read_captions(str(txt)) == [("a cat", ""), ("a dog", "")]

    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"caption": "a cat", "url": "u1"}\n\n{"caption": null, "url": "u2"}\n'
                     '{"caption": "a dog"}\n')
    assert cap.read_captions(str(jsonl)) == [("a cat", "u1"), ("a dog", "")]
    with pytest.raises(cap.CaptionStageError, match="unknown caption column 'TEXT'"):
        cap.read_captions(str(jsonl), caption_column="TEXT")

    laion = tmp_path / "laion.parquet"
    pq.write_table(pa.table({"TEXT": ["a cat", None, "a dog"], "URL": ["u1", "u2", "u3"],
                             "AESTHETIC_SCORE": [6.6, 6.7, 6.8]}), laion)
    assert cap.read_captions(str(laion)) == [("a cat", "u1"), ("a dog", "u3")]
    assert cap.read_captions(str(laion), url_column="AESTHETIC_SCORE")[0] == ("a cat", "6.6")
    with pytest.raises(cap.CaptionStageError, match=r"unknown caption column 'caption'.*TEXT, URL"):
        cap.read_captions(str(laion), caption_column="caption")

    no_text = tmp_path / "n.parquet"
    pq.write_table(pa.table({"x": [1]}), no_text)
    with pytest.raises(cap.CaptionStageError, match="no caption column"):
        cap.read_captions(str(no_text))
    with pytest.raises(cap.CaptionStageError, match="does not exist"):
        cap.read_captions(str(tmp_path / "missing.txt"))
    (tmp_path / "c.csv").write_text("a\n")
    with pytest.raises(cap.CaptionStageError, match="unknown captions format"):
        cap.read_captions(str(tmp_path / "c.csv"))


def test_partitions_match_the_authors_split():
    rows = list(range(103))
    saved = np.random.get_state()
    try:  # the authors' code: np.random.seed(seed); np.array_split(np.random.permutation(n), P)[p]
        np.random.seed(7)
        authors = np.array_split(np.random.permutation(len(rows)), 4)
    finally:
        np.random.set_state(saved)
    parts = [cap.select_partition(rows, 7, 4, p) for p in range(4)]
    assert [list(a) for a in authors] == parts
    assert sorted(sum(parts, [])) == rows
    with pytest.raises(cap.CaptionStageError, match="outside"):
        cap.select_partition(rows, 7, 4, 4)


# ---------------------------------------------------------------------------- resumable writing


def test_recover_jsonl_drops_partial_last_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"input": "a"}\n{"input": "b"}\n{"input": "c", "ed')
    assert cap.recover_jsonl(str(path)) == [{"input": "a"}, {"input": "b"}]
    assert path.read_bytes() == b'{"input": "a"}\n{"input": "b"}\n'
    path.write_bytes(b'{"input": "a"}\nnot json\n{"input": "b"}\n')
    with pytest.raises(cap.CaptionStageError, match=r"p.jsonl:2"):
        cap.recover_jsonl(str(path))


class ScriptedBackend:
    """Completions from a rule: captions containing "never" never get a usable one; captions
    containing "twice" get a bad one on their first try. Raises after `die_after` calls."""

    def __init__(self, die_after=None):
        self.die_after, self.calls, self.prompts, self.seeds = die_after, 0, [], []
        self.tries: dict = {}

    def generate(self, prompts, seed):
        if self.die_after is not None and self.calls == self.die_after:
            raise RuntimeError("killed")
        self.calls += 1
        self.seeds.append(seed)
        out = []
        for prompt in prompts:
            self.prompts.append(prompt)
            caption = prompt[:-len(cap.PROMPT_SEPARATOR)]
            self.tries[caption] = self.tries.get(caption, 0) + 1
            if "never" in caption or ("twice" in caption and self.tries[caption] == 1):
                out.append(f"keep it\n%%\n{caption}.")  # output == input: rejected
            else:
                out.append(f"make it blue\n%%\n{caption} in blue\nEND")
        return out


def _captions():
    rows = [cap.CaptionRow(f"photo {i}" + (" twice" if i % 3 == 0 else ""), f"u{i}") for i in range(30)]
    rows[4] = cap.CaptionRow("photo never", "u4")
    rows[7] = cap.CaptionRow("photo 1", "u-other")  # duplicate caption
    rows[9] = cap.CaptionRow("photo 9 new", "u2")  # duplicate URL
    return rows


def test_stage_resumes_after_kill_without_duplicates_or_losses(tmp_path):
    out = str(tmp_path / "part.jsonl")
    rows = _captions()
    with pytest.raises(RuntimeError, match="killed"):
        cap.run_caption_stage(rows, ScriptedBackend(die_after=3), out, num_samples=20, batch_size=4,
                              progress=False)
    before = open(out, "rb").read()
    assert before.count(b"\n") >= 6
    with open(out, "ab") as f:  # the kill hit in the middle of a line
        f.write(b'{"input": "photo 99", "edit": "make')

    resumed = ScriptedBackend()
    result = cap.run_caption_stage(rows, resumed, out, num_samples=20, batch_size=4, progress=False)
    after = open(out, "rb").read()
    assert after.startswith(before)  # nothing written before the kill is lost or changed
    records = [json.loads(line) for line in after.decode().splitlines()]
    assert result.written == len(records) == 20
    inputs = [r["input"] for r in records]
    assert len(set(inputs)) == 20 and "photo 99" not in inputs
    assert len({r["url"] for r in records}) == 20
    assert all(r["output"] == r["input"] + " in blue" and r["edit"] == "make it blue" for r in records)
    done_before = {json.loads(line)["input"] for line in before.decode().splitlines()}
    assert not any(p[:-4] in done_before for p in resumed.prompts)  # done captions are not asked again

    rejected = cap.recover_jsonl(cap.rejected_path(out))
    assert [r["input"] for r in rejected] == ["photo never"]
    assert rejected[0]["reasons"] == ["output_equals_input"] * 4
    # a third run has nothing left to do and asks nothing
    again = ScriptedBackend()
    assert cap.run_caption_stage(rows, again, out, num_samples=20, progress=False).new == 0
    assert again.calls == 0


def test_stage_counts_retries_duplicates_and_stops_at_num(tmp_path):
    out = str(tmp_path / "p.jsonl")
    backend = ScriptedBackend()
    result = cap.run_caption_stage(_captions(), backend, out, num_samples=10, batch_size=3, seed=5,
                                   progress=False)
    assert result.written == result.new == 10
    assert len(cap.recover_jsonl(out)) == 10
    assert result.rejections["output_equals_input"] >= 4  # "never" 4 times + "twice" first tries
    assert result.duplicates == 2 and result.given_up == 1
    assert backend.prompts.count("photo 1\n##\n") == 1  # the duplicate caption is never asked
    assert len(set(backend.seeds)) == len(backend.seeds)  # every call gets its own seed
    # the same run again from scratch gives the same seeds
    replay = ScriptedBackend()
    cap.run_caption_stage(_captions(), replay, str(tmp_path / "q.jsonl"), num_samples=10, batch_size=3,
                          seed=5, progress=False)
    assert replay.seeds == backend.seeds


def test_stage_blocklist_skips_inputs(tmp_path):
    out = str(tmp_path / "p.jsonl")
    rows = [cap.CaptionRow("a gory scene with gore", "u1"), cap.CaptionRow("a cat", "u2")]
    backend = ScriptedBackend()
    result = cap.run_caption_stage(rows, backend, out, num_samples=5, blocklist=BLOCK, progress=False)
    assert result.written == 1 and backend.prompts == ["a cat\n##\n"]
    assert cap.recover_jsonl(cap.rejected_path(out))[0]["reasons"] == ["blocked_input (gore)"]


# ---------------------------------------------------------------------------- transformers backend


def _tiny_tokenizer():
    """A byte-level BPE (GPT-2 style) over the 256 byte symbols plus a few merged words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}  # set order varies
    merges = []
    for word in ["END", "##", "%%", "Ġcat", "Ġdog", "Ġred", "Ġmake", "Ġthe"]:
        piece = word[0]
        for ch in word[1:]:
            merges.append((piece, ch))
            piece += ch
            vocab.setdefault(piece, len(vocab))
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


def _save_tiny_gpt2(directory, tokenizer, boost: float) -> str:
    """A random 2-layer GPT-2; `boost` raises the logits of "\\n" and "END" so that samples
    often contain the stop sequence."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                        initializer_range=0.3, bos_token_id=eos, eos_token_id=eos)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        direction = torch.randn(32)
        direction /= direction.norm()
        model.transformer.ln_f.bias.copy_(direction)
        for token in ("Ċ", "END"):
            model.transformer.wte.weight[tokenizer.convert_tokens_to_ids(token)] += boost * direction
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def tiny_lms(tmp_path_factory):
    tokenizer = _tiny_tokenizer()
    root = tmp_path_factory.mktemp("tiny_lm")
    return {"plain": _save_tiny_gpt2(root / "plain", tokenizer, 0.0),
            "stoppy": _save_tiny_gpt2(root / "stoppy", tokenizer, 6.0)}


PROMPTS = [cap.format_prompt(c) for c in
           ["a red cat", "the dog", "make the red dog and a cat sit on a mat", "x", "a cat", "the red dog"]]


def _reference_generate(model_dir, prompts, seed, **kwargs):
    """transformers' own generate on a left-padded batch; completions decoded and cut at the
    first "\\nEND" of the generated text. Returns (cut, raw) texts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**batch, pad_token_id=tokenizer.pad_token_id, **kwargs)
    raw = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return [r.split("\nEND", 1)[0] for r in raw], raw


def test_transformers_backend_equals_generate_and_cuts_at_stop(tiny_lms):
    import torch
    from ip2p_jax.datagen.captions.transformers_backend import TransformersBackend

    settings = cap.SamplingSettings(max_tokens=40, frequency_penalty=0.0)
    backend = TransformersBackend(tiny_lms["stoppy"], settings)
    rng_before = torch.get_rng_state()
    got = backend.generate(PROMPTS, seed=3)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is left alone
    expected, raw = _reference_generate(tiny_lms["stoppy"], PROMPTS, 3, do_sample=True, temperature=0.7,
                                        top_k=0, top_p=1.0, max_new_tokens=40)
    assert got == expected
    cut = [r for r, g in zip(raw, got) if len(r) > len(g) + len("\nEND")]
    assert len(cut) >= 2, raw  # the stop sequence really ended some rows early
    assert backend.generate(PROMPTS, seed=3) == got
    assert backend.generate(PROMPTS, seed=4) != got


def test_transformers_backend_left_padding_greedy(tiny_lms):
    from ip2p_jax.datagen.captions.transformers_backend import TransformersBackend

    backend = TransformersBackend(tiny_lms["plain"], cap.SamplingSettings(temperature=0, max_tokens=12,
                                                                              frequency_penalty=0.0))
    batched = backend.generate(PROMPTS, seed=0)
    alone = [backend.generate([p], seed=0)[0] for p in PROMPTS]
    assert batched == alone
    assert len(set(batched)) > 1  # outputs depend on the prompt: the check can fail
    expected, _ = _reference_generate(tiny_lms["plain"], PROMPTS, 0, do_sample=False, max_new_tokens=12)
    assert batched == expected


def test_openai_penalties_formula():
    import torch
    from ip2p_jax.datagen.captions.transformers_backend import _openai_penalties

    prompt = [[5, 1, 1], [0, 2, 2]]  # two rows, prompt length 3 (prompt tokens don't count)
    generated = [[1, 1, 3], [4, 4, 4]]
    input_ids = torch.tensor([p + g for p, g in zip(prompt, generated)])
    scores = torch.zeros(2, 6)
    got = _openai_penalties(3, frequency=0.1, presence=0.5)(input_ids, scores)
    expected = torch.zeros(2, 6)
    expected[0, 1] = -(0.1 * 2 + 0.5)
    expected[0, 3] = -(0.1 * 1 + 0.5)
    expected[1, 4] = -(0.1 * 3 + 0.5)
    assert torch.allclose(got, expected)


def test_stop_criterion_only_looks_at_generated_text():
    import torch
    from ip2p_jax.datagen.captions.transformers_backend import _stop_on_text

    tokenizer = _tiny_tokenizer()
    prompt = tokenizer("a cat\n##\n")["input_ids"]
    stop = _stop_on_text(tokenizer, len(prompt), "\nEND")

    def stops(completion):
        ids = torch.tensor([prompt + tokenizer(completion)["input_ids"]])
        return bool(stop(ids, None)[0])

    assert not stops("END")  # "\n" + "END" across the prompt boundary is not a stop
    assert not stops("make it red\n%%\na red cat")
    assert stops("make it red\n%%\na red cat\nEND")
    assert stops("x\nENDING")  # OpenAI stops on the string, even inside a longer word


def test_transformers_backend_missing_folder(tmp_path):
    from ip2p_jax.datagen.captions.transformers_backend import TransformersBackend

    with pytest.raises(cap.BackendError, match="does not exist"):
        TransformersBackend(str(tmp_path / "nope"))
    with pytest.raises(cap.BackendError, match="no config.json"):
        TransformersBackend(str(tmp_path))


# ---------------------------------------------------------------------------- HTTP backend


class StubServer:
    """An OpenAI-style /v1/completions stub: answers from a script of (status, body) and
    records every request."""

    def __init__(self):
        self.script: list = []
        self.requests: list = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                status, answer = stub.script.pop(0) if stub.script else (200, None)
                if answer is None:  # echo: completions in reverse order, to test sorting by index
                    prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
                    answer = {"choices": [{"index": i, "text": f"edit {i}\n%%\nout {i}\nEND extra"}
                                          for i in reversed(range(len(prompts)))]}
                data = json.dumps(answer).encode() if isinstance(answer, dict) else answer.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    server = StubServer()
    yield server
    server.close()


def _closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def _http_backend(base_url, **kwargs):
    from ip2p_jax.datagen.captions.http_backend import OpenAICompletionsBackend

    return OpenAICompletionsBackend(base_url, "my-model", retry_wait=0.01, **kwargs)


def test_http_backend_request_and_answer(stub, monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-test")
    backend = _http_backend(stub.base_url, api_key_env="MY_KEY")
    assert backend.generate(["a\n##\n", "b\n##\n"], seed=11) == ["edit 0\n%%\nout 0", "edit 1\n%%\nout 1"]
    (request,) = stub.requests
    assert request["path"] == "/v1/completions"
    assert request["headers"]["Authorization"] == "Bearer sk-test"
    assert request["body"] == {"model": "my-model", "prompt": ["a\n##\n", "b\n##\n"], "max_tokens": 256,
                               "temperature": 0.7, "top_p": 1.0, "frequency_penalty": 0.1,
                               "presence_penalty": 0.0, "stop": ["\nEND"], "n": 1, "seed": 11}


def test_http_backend_retries_then_fails_clearly(stub, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    backend = _http_backend(stub.base_url, max_retries=2)
    stub.script = [(503, "overloaded"), (429, {"error": {"message": "slow down"}})]
    assert backend.generate(["a\n##\n"], seed=0) == ["edit 0\n%%\nout 0"]
    assert len(stub.requests) == 3 and "Authorization" not in stub.requests[0]["headers"]

    stub.requests.clear()
    stub.script = [(400, {"error": {"message": "model 'my-model' not found"}})]
    with pytest.raises(cap.BackendError, match="HTTP 400: model 'my-model' not found"):
        backend.generate(["a\n##\n"], seed=0)
    assert len(stub.requests) == 1  # no retry on a client error

    stub.script = [(500, "boom")] * 3
    with pytest.raises(cap.BackendError, match=r"HTTP 500: boom \(gave up after 3 attempts\)"):
        backend.generate(["a\n##\n"], seed=0)
    stub.script = [(200, {"choices": []})]
    with pytest.raises(cap.BackendError, match="expected 1 choices, got 0"):
        backend.generate(["a\n##\n"], seed=0)

    with pytest.raises(cap.BackendError, match="cannot reach the server"):
        _http_backend(_closed_port_url(), max_retries=1).generate(["a\n##\n"], seed=0)
    with pytest.raises(cap.BackendError, match="OPENAI_API_KEY"):
        _http_backend("https://api.openai.com/v1")


def test_http_backend_falls_back_to_one_prompt_per_request(stub):
    backend = _http_backend(stub.base_url)
    stub.script = [(422, {"error": {"message": "prompt must be a string"}})]
    assert backend.generate(["a\n##\n", "b\n##\n"], seed=3) == ["edit 0\n%%\nout 0"] * 2
    assert [r["body"]["prompt"] for r in stub.requests] == [["a\n##\n", "b\n##\n"], "a\n##\n", "b\n##\n"]
    stub.requests.clear()
    backend.generate(["c\n##\n", "d\n##\n"], seed=4)  # remembered: no list is tried again
    assert [r["body"]["prompt"] for r in stub.requests] == ["c\n##\n", "d\n##\n"]

    backend = _http_backend(stub.base_url)  # a server that answers a list with one choice
    stub.script = [(200, {"choices": [{"index": 0, "text": "x"}]})]
    assert len(backend.generate(["a\n##\n", "b\n##\n"], seed=0)) == 2 and backend.one_prompt_per_request
    backend = _http_backend(stub.base_url)  # other client errors are not a reason to split
    stub.script = [(401, {"error": {"message": "bad key"}})]
    with pytest.raises(cap.BackendError, match="HTTP 401: bad key"):
        backend.generate(["a\n##\n", "b\n##\n"], seed=0)


# ---------------------------------------------------------------------------- CLI


def _cli(*argv):
    return generate_captions.main(list(argv))


def test_cli_end_to_end_with_stub_server_and_resume(stub, tmp_path, capsys):
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps({"TEXT": f"photo {i}", "URL": f"u{i}"}) + "\n" for i in range(9)))
    out = tmp_path / "prompts"
    common = ["--captions", str(captions), "--out", str(out), "--backend", "openai", "--base-url",
              stub.base_url, "--model", "m", "--batch-size", "2", "--num-partitions", "2", "--partition", "1",
              "--no-progress"]
    assert _cli(*common, "--num", "3") == 0
    path = out / "part-00001-of-00002.jsonl"
    records = cap.recover_jsonl(str(path))
    assert len(records) == 3 and set(records[0]) == {"input", "edit", "output", "url"}
    assert _cli(*common, "--num", "100") == 0  # resume: the partition holds 4 captions
    assert len(cap.recover_jsonl(str(path))) == 4
    assert "captions ran out" in capsys.readouterr().err

    human = tmp_path / "human.jsonl"
    human.write_text(json.dumps({"input": "a", "edit": "b", "output": "c"}) + "\n")
    assert _cli("--export-finetune", str(human), str(tmp_path / "ft.jsonl")) == 0


def test_cli_exit_codes(tmp_path, capsys, tiny_lms):
    captions = tmp_path / "c.jsonl"
    captions.write_text('{"caption": "a cat", "url": "u"}\n{"caption": "a dog", "url": "v"}\n')
    base = ["--out", str(tmp_path / "o"), "--no-progress"]
    cases = [
        (["--captions", str(tmp_path / "missing.txt"), "--backend", "openai", "--model", "m"], "does not exist"),
        (["--captions", str(captions), "--caption-column", "TEXT", "--backend", "openai", "--model", "m"],
         "unknown caption column 'TEXT'"),
        (["--captions", str(captions), "--backend", "transformers", "--model", str(tmp_path / "no_model")],
         "model folder"),
        (["--captions", str(captions), "--backend", "openai", "--model", "m", "--base-url", _closed_port_url(),
          "--max-retries", "0"], "cannot reach the server"),
        (["--export-finetune", str(tmp_path / "nope.jsonl"), str(tmp_path / "ft.jsonl")], "does not exist"),
    ]
    for argv, message in cases:
        assert _cli(*base, *argv) == 2, argv
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse: missing --model
        _cli(*base, "--captions", str(captions), "--backend", "openai")
    assert exit_info.value.code == 2

    # the tiny random model writes garbage: every caption is tried 4 times and given up, cleanly
    assert _cli(*base, "--captions", str(captions), "--backend", "transformers", "--model", tiny_lms["plain"],
                "--max-tokens", "6", "--num", "2") == 0
    rejected = cap.recover_jsonl(str(tmp_path / "o" / "part-00000-of-00001.rejected.jsonl"))
    assert sorted(r["input"] for r in rejected) == ["a cat", "a dog"]
    assert all(len(r["reasons"]) == 4 for r in rejected)
