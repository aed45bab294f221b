"""Fixtures for the data tests: Qwen's real tokenizer, a private token cache, file writers."""

from __future__ import annotations

import gzip
import json

import pytest

from models.qwen.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def tok():
    return Tokenizer.default()


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test gets its own token cache root through the documented env var."""
    root = tmp_path / "qwen-tune-cache"
    monkeypatch.setenv("QWEN_TUNE_CACHE", str(root))
    return root


@pytest.fixture(scope="session")
def hf_tok(tok, tmp_path_factory):
    """transformers' tokenizer over the same vocabulary: an independent BPE + Jinja reference."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("hf_tok")
    tok.save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


def write_jsonl(path, records, gz=False):
    lines = "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(lines)
    else:
        path.write_text(lines, encoding="utf-8")
    return path
