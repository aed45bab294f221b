"""Every code block of README.md and docs/*.md is run (or parsed) by this test, so the
documentation cannot drift from the code.

- ```python blocks run in a subprocess, in a scratch project folder that holds what the block
  names: a tiny random Qwen2 checkpoint written by transformers under the checkpoint name the
  block uses (`Qwen2.5-0.5B`), a corpus, SFT and preference data, a LLaMA-Factory recipe.
- ```bash blocks run there too, line by line under `bash -e`, with `python examples/X.py` and
  `qwen-tune X` pointed at this checkout.
- ```json / ```yaml blocks are parsed.
- A block preceded by `<!-- doc-test: file NAME -->` is written to NAME in that folder before
  any block runs (the LLaMA-Factory recipe the README's command trains with).
- A block preceded by `<!-- doc-test: skip (reason) -->` is not run; the reason must say what
  runs it instead (or why nothing can here), and the number of such blocks is capped below, so
  a new skip is a visible change.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import child_threads

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[a-z]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.S | re.M)
SKIP = re.compile(r"<!-- doc-test: skip \((?P<why>[^)]{12,}.*?)\) -->\s*$")
FILE = re.compile(r"<!-- doc-test: file (?P<name>[\w./-]+) -->\s*$")
CHECKPOINT = "Qwen2.5-0.5B"


def blocks():
    """(file, line, language, body, skip reason or None) for every fenced block."""
    out = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
            skip, file = SKIP.search(before), FILE.search(before)
            body = "\n".join(l[len(m["indent"]):] for l in m["body"].splitlines())
            mark = skip["why"] if skip else (f"file:{file['name']}" if file else None)
            out.append((path.relative_to(ROOT).as_posix(), line, m["lang"], body, mark))
    return out


BLOCKS = blocks()
RUN = [b for b in BLOCKS if b[4] is None and b[2] in ("bash", "python")]
PARSE = [b for b in BLOCKS if (b[4] is None or b[4].startswith("file:")) and b[2] in ("json", "yaml")]
FILES = [(b[4][len("file:"):], b[3]) for b in BLOCKS if b[4] and b[4].startswith("file:")]


def test_every_block_is_run_parsed_or_skipped_with_a_reason():
    for file, line, lang, _, skip in BLOCKS:
        assert lang in ("bash", "python", "json", "yaml", "text"), f"{file}:{line}: a ```{lang or '(none)'} block"
    assert RUN, "no runnable blocks found: the fence pattern is broken"
    skipped = sorted(f"{f}:{lang}" for f, _, lang, _, s in BLOCKS if s and not s.startswith("file:"))
    # The blocks that cannot run here, each with its reason in the file (a new one shows up here).
    assert len(skipped) <= 12, skipped   # +3: the reward, GRPO and KTO real-model commands


def test_the_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    command = next(b[3] for b in BLOCKS if b[0] == "README.md" and "pytest" in b[3]).strip()
    steps = [s.strip() for s in command.split("&&")]
    assert steps[0] == "python3 -m venv .venv" and steps[1] == ". .venv/bin/activate"
    for step in steps:
        assert step.replace("pip install torch==2.13.0", "pip install -q torch==2.13.0").replace(
            'pip install -e ".[test]"', 'pip install -q -e ".[test]"') in ci, (step, "not in .ci/run")
    assert "The README's test command" in ci and readme.count("python -m pytest -q") >= 1


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A user's project folder with what the documentation's commands name."""
    from models.qwen import Tokenizer
    from tests.helpers import tiny_checkpoint
    from tests.models.tokenizer_dirs import QWEN25_TEMPLATE, tokenizer_dir

    home = tmp_path_factory.mktemp("project")
    model = home / CHECKPOINT  # as downloaded: weights, config, Qwen's tokenizer files and chat template
    tiny_checkpoint(model, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=4096)
    Tokenizer.default().save_pretrained(home / "tokenizer")
    tokenizer_dir(home / "tokenizer", model, QWEN25_TEMPLATE)
    corpus = home / "corpus"
    corpus.mkdir()
    for i in range(8):  # about 6 blocks of the default 2048 tokens
        (corpus / f"doc{i}.txt").write_text(
            f"Document {i}. The json module encodes Python objects as JSON text and decodes it. " * 100,
            encoding="utf-8")
    qa = [("What does json.dumps do?", "It writes JSON text."), ("What is a socket?", "A network endpoint."),
          ("What is TLS?", "Encryption for sockets."), ("What is a queue?", "First in, first out.")] * 2
    with open(home / "sft.jsonl", "w", encoding="utf-8") as f:
        for q, a in qa:
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": a}]}) + "\n")
    with open(home / "pairs.jsonl", "w", encoding="utf-8") as f:
        for i, (q, a) in enumerate(qa):
            f.write(json.dumps({"prompt": q, "chosen": a, "rejected": qa[(i + 1) % len(qa)][1]}) + "\n")
    (home / "data").mkdir()
    (home / "data" / "dataset_info.json").write_text(json.dumps({"demo_sft": {"file_name": "sft.jsonl"}}))
    (home / "data" / "sft.jsonl").write_text((home / "sft.jsonl").read_text())
    for name, body in FILES:
        (home / name).write_text(body + "\n", encoding="utf-8")
    return home


def run_block(body: str, lang: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=child_threads(), QWEN_TUNE_CACHE=str(cwd / ".cache"))
    if lang == "python":
        return subprocess.run([sys.executable, "-c", body], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=600)
    python, examples = shlex.quote(sys.executable), shlex.quote(str(ROOT / "examples"))
    script = re.sub(r"(?m)^python examples/", f"{python} {examples}/", body)
    script = re.sub(r"(?m)^qwen-tune ", f"{python} -m examples ", script)
    return subprocess.run(["bash", "-e", "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.slow
def test_the_runnable_blocks_run(project):
    """In document order (later blocks use what earlier ones wrote, as a reader would)."""
    for file, line, lang, body, _ in RUN:
        proc = run_block(body, lang, project)
        assert proc.returncode == 0, f"{file}:{line} ```{lang} exited {proc.returncode}\n{proc.stderr[-3000:]}"


@pytest.mark.parametrize("block", PARSE, ids=[f"{b[0]}:{b[1]}" for b in PARSE])
def test_the_data_blocks_parse(block):
    file, line, lang, body, _ = block
    if lang == "json":
        json.loads(body)
    else:
        yaml.safe_load(body)
