"""examples/dpo.py through a subprocess, as a user runs it after sft.py: TRL-named metrics, the
outputs the next tools load, the reference-free losses, the precomputed reference."""

from __future__ import annotations

import json

import pytest
import torch

from tests.examples.conftest import assert_usage_error, run_script
from tests.helpers import tiny_checkpoint

QA = [("What is a socket?", "An endpoint for data.", "A kind of fruit."),
      ("What does json do?", "It encodes objects as text.", "It bakes bread."),
      ("What is TLS?", "Encryption for sockets.", "A shade of blue."),
      ("What is a queue?", "A first-in first-out list.", "A type of hat.")] * 3


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dpo")
    model, _ = tiny_checkpoint(tmp / "sft-merged", vocab_size=151936, tie_word_embeddings=True)
    from models.qwen import Tokenizer

    Tokenizer.default().save_pretrained(model)
    pairs = tmp / "pairs.jsonl"
    with open(pairs, "w", encoding="utf-8") as f:
        for i, (q, good, bad) in enumerate(QA):
            if i % 2:   # TRL's string form and its message-list form
                f.write(json.dumps({"prompt": q, "chosen": good, "rejected": bad}) + "\n")
            else:
                f.write(json.dumps({"prompt": [{"role": "user", "content": q}],
                                    "chosen": [{"role": "assistant", "content": good}],
                                    "rejected": [{"role": "assistant", "content": bad}]}) + "\n")
    return model, pairs, tmp


def dpo(sft_model, out, *extra):
    model, pairs, tmp = sft_model
    return run_script("dpo.py", "--model", model, "--data", pairs, "--out", out, "--batch-size", "2", "--grad-accum", "2",
                      "--max-steps", "3", "--lr", "1e-2", "--lora-r", "4", "--lora-dropout", "0", "--dtype", "fp32",
                      "--eval-fraction", "0.25", "--max-len", "64", "--sample-questions", "0", *extra,
                      cache=tmp / "cache")


def rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_dpo_writes_trl_metrics_and_outputs_peft_and_transformers_load(sft_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "dpo"
    proc = dpo(sft_model, out, "--report-to", "tensorboard")
    assert proc.returncode == 0, proc.stderr[-3000:]
    train = [r for r in rows(out) if "loss" in r]
    names = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
             "logps/rejected"}
    assert len(train) == 3 and names <= set(train[0]) and train[0]["pairs"] == 4
    assert train[0]["loss"] == pytest.approx(0.6931, abs=1e-3)            # a fresh adapter: ln 2
    evals = [r for r in rows(out) if "val_loss" in r]
    assert {f"val_{n}" for n in names} <= set(evals[-1])
    assert "held-out before: loss 0.6931" in proc.stdout and "held-out after:" in proc.stdout
    _tensorboard_has_trl_tags(out, train, evals, names)
    assert "next: python examples/generate.py --model" in proc.stdout
    base = AutoModelForCausalLM.from_pretrained(sft_model[0], dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, out / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    assert json.loads((out / "merged" / "config.json").read_text())["eos_token_id"] == 151645
    ids = torch.tensor([[9707, 1879, 13, 3555]])
    with torch.no_grad():
        a, m = adapted(ids).logits, merged(ids).logits
    # merged vs PEFT-adapted, fp32: observed 2.9e-7 (34x margin)
    assert float((a - m).abs().max() / a.abs().max()) < 1e-5


def _tensorboard_has_trl_tags(out, train, evals, names):
    """TensorBoard (its own reader) shows TRL's tags: train/rewards/chosen ... for the training
    steps, eval/rewards/chosen, eval/logps/chosen ..., eval/loss for the held-out pairs."""
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = ea.EventAccumulator(str(out / "runs"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {f"train/{n}" for n in names} | {f"eval/{n}" for n in names} | {"train/loss", "eval/loss"} <= tags
    assert not any(t.startswith("train/val_") for t in tags), sorted(tags)
    for n in ("rewards/margins", "logps/chosen"):
        assert [(e.step, e.value) for e in acc.Scalars(f"eval/{n}")] == [
            (r["step"], pytest.approx(r[f"val_{n}"], rel=1e-6)) for r in evals]
        assert [(e.step, e.value) for e in acc.Scalars(f"train/{n}")] == [
            (r["step"], pytest.approx(r[n], rel=1e-6)) for r in train]


def test_precomputed_reference_gives_the_same_run(sft_model, tmp_path):
    first, second = tmp_path / "adapters", tmp_path / "precomputed"
    assert dpo(sft_model, first).returncode == 0
    proc = dpo(sft_model, second, "--reference", "precomputed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reference log-probs computed once" in proc.stdout
    for a, b in zip(rows(first), rows(second)):
        for key in ("loss", "rewards/margins", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("loss", ["simpo", "orpo", "ipo"])
def test_other_losses_run(sft_model, tmp_path, loss):
    out = tmp_path / loss
    proc = dpo(sft_model, out, "--loss", loss, "--max-steps", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rewards/accuracies" in rows(out)[0]


def test_bad_pairs_and_flags_are_one_line(sft_model, tmp_path):
    model, _, tmp = sft_model
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "a"}\n')
    proc = run_script("dpo.py", "--model", model, "--data", bad, "--out", tmp_path / "o", cache=tmp / "cache")
    assert_usage_error(proc, "bad.jsonl:2")
    proc = run_script("dpo.py", "--model", model, "--data", bad, "--out", tmp_path / "o", "--finetuning", "full",
                      cache=tmp / "cache")
    assert_usage_error(proc, "--finetuning full", "LoRA")
    proc = run_script("dpo.py", "--model", model, "--data", bad, "--loss", "ipo", "--label-smoothing", "0.1",
                      "--out", tmp_path / "o", cache=tmp / "cache")
    assert_usage_error(proc, "--label-smoothing applies to --loss sigmoid and simpo")
    assert not (tmp_path / "o").exists()
