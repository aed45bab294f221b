"""The embedded default's base-model recipe (demo/base_model.py) on a tiny shape:
compact-vocabulary pretraining, growing back to Qwen's 151936 rows, caching, resuming."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from demo import base_model
from models.qwen import Tokenizer, load
from train import Interrupted

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


@pytest.fixture
def tiny_recipe(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN_TUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(base_model, "BASE_SHAPE", dict(base_model.BASE_SHAPE, hidden_size=32, intermediate_size=64,
                                                       num_hidden_layers=1))
    monkeypatch.setattr(base_model, "PRETRAIN", dict(base_model.PRETRAIN, block_size=32, batch_size=4, steps=40,
                                                     warmup_steps=1, full_vocab_steps=0, save_every=10))


def test_demo_base_is_pretrained_once_grown_to_the_full_vocabulary_and_cached(tmp_path, tiny_recipe):
    tok = Tokenizer.default()
    lines = []
    path = base_model.ensure_base(tmp_path / "base", tok, corpus(tmp_path), lines.append)
    info = json.loads((path / "pretrain.json").read_text(encoding="utf-8"))
    # Phase 1 learned (tiny repetitive corpus: the loss falls a lot), and growing back to the
    # full vocabulary changed nothing: the compact softmax was the full one.
    assert info["eval_loss_compact_vocab"] < info["eval_loss_at_init"] - 1.0
    assert abs(info["eval_loss_after_growing_back"] - info["eval_loss_compact_vocab"]) < 1e-4
    model = load(path, dtype=torch.float32)
    assert model.config.vocab_size == 151936 and model.is_tied
    # Cached: a second call trains nothing and says so.
    lines.clear()
    assert base_model.ensure_base(tmp_path / "base", tok, corpus(tmp_path), lines.append) == path
    assert len(lines) == 1 and "cached" in lines[0]


def test_interrupted_pretraining_continues_where_it_stopped(tmp_path, tiny_recipe, monkeypatch):
    """Ctrl-C during the one-time pretraining: Interrupted with a checkpoint, no model cached; the
    next call resumes from that checkpoint and ends with the model an uninterrupted run makes."""
    import train.loop

    tok = Tokenizer.default()
    whole = base_model.ensure_base(tmp_path / "whole", tok, corpus(tmp_path), lambda s: None)
    calls = {"n": 0}
    real_step = train.loop.Trainer.train_step

    def step_then_sigint(self):
        out = real_step(self)
        calls["n"] += 1
        if calls["n"] == 13:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGINT)   # as Ctrl-C does, in the middle of step 13's loop
        return out

    monkeypatch.setattr(train.loop.Trainer, "train_step", step_then_sigint)
    with pytest.raises(Interrupted) as e:
        base_model.ensure_base(tmp_path / "base", tok, corpus(tmp_path), lambda s: None)
    assert e.value.signal == "SIGINT" and e.value.step == 13 and e.value.checkpoint.endswith("step-13")
    assert not (tmp_path / "base" / "config.json").exists()
    lines = []
    path = base_model.ensure_base(tmp_path / "base", tok, corpus(tmp_path), lines.append)
    assert any("continuing the interrupted pretraining" in line for line in lines)
    assert any("resume: continuing from" in line and "step-13" in line for line in lines)
    assert calls["n"] == 40   # 13 before the stop + 27 after: nothing trained twice
    a, b = load(path, dtype=torch.float32).state_dict(), load(whole, dtype=torch.float32).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cpt_with_no_arguments_on_a_fresh_machine_pretrains_the_base_first(tmp_path, tiny_recipe, monkeypatch):
    """`python examples/cpt.py` with an empty cache: the run records its model folder's content,
    so the base is pretrained before the output folder is claimed (it used to fail with "No such
    file or directory: .../pydocs-base-..." on every fresh machine)."""
    from demo import corpus as demo_corpus
    from examples import cpt

    tiny = corpus(tmp_path)
    monkeypatch.setattr(demo_corpus, "build", lambda: tiny)
    monkeypatch.chdir(tmp_path)
    assert not base_model.base_dir().exists()
    assert cpt.main(["--data", str(tiny.domain), "--block-size", "16", "--max-steps", "1", "--sample-tokens", "1"]) == 0
    run = json.loads((tmp_path / "runs" / "cpt" / "run.json").read_text(encoding="utf-8"))
    assert (base_model.base_dir() / "config.json").is_file()
    assert any(name.endswith("config.json") for name in run["inputs"]["--model"])
