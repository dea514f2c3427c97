"""Every command block in README.md and docs/*.md runs as written here, or says why it cannot.

The line above each command block (```bash, ```python, or an untagged block that starts with a
command) is a marker comment:
  <!-- docs: run -->              this test runs the block as written (bash, in a scratch copy of the
                                  checkout's examples/ configs/ scripts/ with ip2p_jax/ linked, the test
                                  venv first on PATH and as .venv)
  <!-- docs: tested by FILE -->   a test file that runs these commands (it must exist and name them)
  <!-- docs: needs REASON -->     real weights, a GPU, a language model server, hours: not run here
  <!-- docs: synopsis -->         a usage summary, not a command to run
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
MARKER = re.compile(r"<!-- docs: (run|tested by (\S+)|needs .+|synopsis) -->")
COMMAND_WORDS = ("ip2p ", "python", ".venv/", "make ", "cat ", "vllm ", "from ", "import ", "gcloud ")


def _blocks(path):
    """(line number, language, text, marker line) of every fenced block in a markdown file."""
    lines, out, i = open(path).read().splitlines(), [], 0
    while i < len(lines):
        if lines[i].startswith("```"):
            start, lang = i, lines[i][3:].strip()
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                i += 1
            marker = lines[start - 1].strip() if start else ""
            out.append((start + 1, lang, "\n".join(lines[start + 1:i]), marker))
        i += 1
    return out


def _is_command(lang, text):
    first = text.lstrip().splitlines()[0] if text.strip() else ""
    return lang in ("bash", "sh", "console", "python") or (not lang and first.startswith(COMMAND_WORDS))


COMMAND_BLOCKS = [(os.path.relpath(p, ROOT), n, lang, text, marker)
                  for p in DOCS for n, lang, text, marker in _blocks(p) if _is_command(lang, text)]


def test_the_docs_have_command_blocks():
    assert len(COMMAND_BLOCKS) >= 10 and any(m == "<!-- docs: run -->" for *_, m in COMMAND_BLOCKS)


@pytest.mark.parametrize("where, line, lang, text, marker", COMMAND_BLOCKS,
                         ids=[f"{w}:{n}" for w, n, *_ in COMMAND_BLOCKS])
def test_every_command_block_is_marked(where, line, lang, text, marker):
    match = MARKER.fullmatch(marker)
    assert match, f"{where}:{line}: a command block without a `<!-- docs: ... -->` marker on the line above"
    if match.group(2):
        test_file = os.path.join(ROOT, match.group(2))
        assert os.path.isfile(test_file), f"{where}:{line}: {match.group(2)} does not exist"
        source = open(test_file).read()
        for word in re.findall(r"\b(?:ip2p|make) ([a-z-]+)", text):
            assert f'"{word}"' in source or f" {word}" in source, f"{where}:{line}: {match.group(2)} never runs `{word}`"
    if match.group(1) == "run":
        assert lang == "bash", f"{where}:{line}: only bash blocks run"


RUN_BLOCKS = [b for b in COMMAND_BLOCKS if b[4] == "<!-- docs: run -->"]


@pytest.mark.parametrize("where, line, lang, text, marker", RUN_BLOCKS, ids=[f"{w}:{n}" for w, n, *_ in RUN_BLOCKS])
def test_run_blocks_run_as_written(where, line, lang, text, marker, tmp_path):
    for folder in ("examples", "configs", "scripts"):
        shutil.copytree(os.path.join(ROOT, folder), tmp_path / folder)
    os.symlink(os.path.join(ROOT, "ip2p_jax"), tmp_path / "ip2p_jax")
    bin_dir = os.path.dirname(sys.executable)
    os.symlink(os.path.dirname(bin_dir), tmp_path / ".venv")
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], "PYTHONPATH": ROOT}
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", text], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{where}:{line}:\n{text}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
