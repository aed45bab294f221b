"""examples/kto.py through a subprocess, as a user runs it after sft.py: unpaired rows in TRL's
and LLaMA-Factory's formats, TRL-named metrics, the outputs; bad rows and flags are one line."""

from __future__ import annotations

import json

import pytest

from tests.examples.conftest import assert_usage_error, run_script
from tests.examples.test_dpo import QA
from tests.helpers import tiny_checkpoint


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kto")
    model, _ = tiny_checkpoint(tmp / "sft-merged", vocab_size=151936, tie_word_embeddings=True, hidden_size=16,
                               intermediate_size=32, num_attention_heads=2, num_key_value_heads=1)   # as test_dpo_torchrun
    from models.qwen import Tokenizer

    Tokenizer.default().save_pretrained(model)
    rows = tmp / "feedback.jsonl"
    with open(rows, "w", encoding="utf-8") as f:
        for i, (q, good, bad) in enumerate(QA):
            if i % 3 == 0:   # TRL's strings, TRL's messages, LLaMA-Factory's messages + label
                f.write(json.dumps({"prompt": q, "completion": good, "label": True}) + "\n")
            elif i % 3 == 1:
                f.write(json.dumps({"prompt": [{"role": "user", "content": q}],
                                    "completion": [{"role": "assistant", "content": bad}], "label": False}) + "\n")
            else:
                f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": bad}],
                                    "label": False}) + "\n")
    return model, rows, tmp


def test_kto_writes_trl_metrics_and_an_adapter(sft_model, tmp_path):
    model, rows, tmp = sft_model
    out = tmp_path / "kto"
    proc = run_script("kto.py", "--model", model, "--data", rows, "--out", out, "--batch-size", "4", "--grad-accum", "1",
                      "--max-steps", "2", "--lr", "1e-2", "--lora-r", "4", "--lora-dropout", "0", "--dtype", "fp32",
                      "--eval-fraction", "0.34", "--max-len", "64", "--sample-questions", "0", "--no-merge",
                      "--undesirable-weight", "1.5", cache=tmp / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in metrics if "loss" in r]
    assert len(train) == 2 and all(r["examples"] == 4 for r in train)
    assert {"kl", "count/chosen", "count/rejected"} <= set(train[0])
    assert all(r["count/chosen"] + r["count/rejected"] == 4 for r in train)
    evals = [r for r in metrics if "val_loss" in r]
    assert evals and {"val_kl", "val_rewards/chosen", "val_rewards/rejected", "val_rewards/margins"} <= set(evals[-1])
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert "held-out after:" in proc.stderr + proc.stdout


def test_bad_rows_and_flags_are_one_line(sft_model, tmp_path):
    model, _, tmp = sft_model
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "completion": "a", "label": true}\n{"prompt": "q", "completion": "a", "label": "no"}\n')
    proc = run_script("kto.py", "--model", model, "--data", bad, "--out", tmp_path / "o", "--batch-size", "2",
                      cache=tmp / "cache")
    assert_usage_error(proc, "bad.jsonl:2", "'label' must be true or false")
    assert not (tmp_path / "o").exists()
