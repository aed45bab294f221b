"""The embedded default's base-model recipe (examples/_pipeline._ensure_demo_base) on a tiny
shape: compact-vocabulary pretraining, growing back to Qwen's 151936 rows, caching."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from models.qwen import Tokenizer, load

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

TEXT = ("The json module encodes Python objects as JSON text. A socket is an endpoint for sending "
        "data. The csv module reads and writes tabular data. ")


@dataclass
class Corpus:
    general: Path
    domain: Path
    sft_train: Path


def corpus(tmp_path: Path) -> Corpus:
    def jsonl(name, rows):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return path

    general = jsonl("general.jsonl", [{"text": TEXT * (2 + i % 3), "name": f"g{i}"} for i in range(60)])
    domain = jsonl("domain.jsonl", [{"text": "An event loop runs asynchronous tasks. " * 3, "name": "d"}])
    sft = jsonl("sft.jsonl", [{"messages": [{"role": "user", "content": "What is TLS?"},
                                            {"role": "assistant", "content": "Transport Layer Security."}]}])
    return Corpus(general, domain, sft)


def test_demo_base_is_pretrained_once_grown_to_the_full_vocabulary_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN_TUNE_CACHE", str(tmp_path / "cache"))
    sys.path.insert(0, str(EXAMPLES))
    import _pipeline as P

    monkeypatch.setattr(P, "DEMO_BASE_SHAPE", dict(P.DEMO_BASE_SHAPE, hidden_size=32, intermediate_size=64,
                                                   num_hidden_layers=1))
    monkeypatch.setattr(P, "DEMO_PRETRAIN", dict(P.DEMO_PRETRAIN, block_size=32, batch_size=4, steps=40,
                                                 warmup_steps=1, full_vocab_steps=0))
    tok = Tokenizer.default()
    lines = []
    path = P._ensure_demo_base(tmp_path / "base", tok, corpus(tmp_path), lines.append)
    info = json.loads((path / "pretrain.json").read_text(encoding="utf-8"))
    # Phase 1 learned (tiny repetitive corpus: the loss falls a lot), and growing back to the
    # full vocabulary changed nothing: the compact softmax was the full one.
    assert info["eval_loss_compact_vocab"] < info["eval_loss_at_init"] - 1.0
    assert abs(info["eval_loss_after_growing_back"] - info["eval_loss_compact_vocab"]) < 1e-4
    model = load(path, dtype=torch.float32)
    assert model.config.vocab_size == 151936 and model.is_tied
    # Cached: a second call trains nothing and says so.
    lines.clear()
    assert P._ensure_demo_base(tmp_path / "base", tok, corpus(tmp_path), lines.append) == path
    assert len(lines) == 1 and "cached" in lines[0]
