"""examples/dpo.py under torchrun (2 CPU processes, gloo) against the same command on one process.

The global batch is 4 pairs in both runs: 1 x 2 accumulated on each of two processes, 2 x 2 on
one. Every step then sees the same pairs (train.MicroBatchSampler), the loss is normalised by the
pairs of all ranks, the reference pass (the adapters disabled) runs through the DDP-wrapped model,
the metrics and the held-out evaluation are summed over the ranks: the loss curve, the TRL-named
metrics, the held-out results and the adapter agree with the one-process run to float rounding
(fp32, dropout 0; the seed gives every rank the same adapter initialisation). So does the run
with the reference log-probs precomputed on every rank before training.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.examples.conftest import EXAMPLES, ROOT
from tests.examples.test_dpo import QA
from tests.helpers import tiny_checkpoint

# no warm-up: with HF's schedule step 1 of a warm-up runs at lr 0, and the adapter must move
COMMON = ("--max-steps", "2", "--lr", "1e-2", "--lora-r", "4", "--lora-dropout", "0", "--dtype", "fp32",
          "--eval-fraction", "0.25", "--max-len", "64", "--sample-questions", "0", "--warmup-steps", "0")
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")


def env(cache) -> dict:
    # A dead peer fails the survivors within a minute; one thread per process on the 2-core CI machine.
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", QWEN_TUNE_DIST_TIMEOUT="60",
                QWEN_TUNE_CACHE=str(cache), PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def dpo(model, pairs, out, cache, *extra, processes: int, batch_size: int) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
                if processes > 1 else [sys.executable])
    cmd = [*launcher, str(EXAMPLES / "dpo.py"), "--model", str(model), "--data", str(pairs), "--out", str(out),
           "--batch-size", str(batch_size), "--grad-accum", "2", *COMMON, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(cache), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def rows(out, key):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if key in r]


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory):
    """A tiny SFT model with the default tokenizer and 12 pairs (3 held out by --eval-fraction 0.25)."""
    from models.qwen import Tokenizer

    tmp = tmp_path_factory.mktemp("dpo-torchrun")
    model, _ = tiny_checkpoint(tmp / "sft-merged", vocab_size=151936, tie_word_embeddings=True, hidden_size=16,
                               intermediate_size=32, num_attention_heads=2, num_key_value_heads=1)
    Tokenizer.default().save_pretrained(model)
    pairs = tmp / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": q, "chosen": good, "rejected": bad}) + "\n" for q, good, bad in QA),
                     encoding="utf-8")
    return model, pairs, tmp / "cache"


@pytest.fixture(scope="module")
def one_process(sft_model, tmp_path_factory):
    """The reference run: one process, 2 x 2 pairs per step, the reference = the adapters disabled."""
    model, pairs, cache = sft_model
    out = tmp_path_factory.mktemp("one") / "dpo"
    dpo(model, pairs, out, cache, processes=1, batch_size=2)
    return out


def assert_same_run(two, one):
    """Loss curve, TRL-named metrics and held-out results to 1e-5, the adapter to rtol 1e-4."""
    train1, train2 = rows(one, "loss"), rows(two, "loss")
    assert [r["step"] for r in train2] == [r["step"] for r in train1] == [1, 2]
    assert train1[0]["pairs"] == train2[0]["pairs"] == 4
    assert train1[0]["loss"] == pytest.approx(0.6931, abs=1e-3)          # a fresh adapter: ln 2
    assert abs(train1[-1]["rewards/margins"]) > 1e-3                     # the adapter moved: a real comparison
    for a, b in zip(train1, train2):
        for key in METRICS:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
    eval1, eval2 = rows(one, "val_loss"), rows(two, "val_loss")
    assert len(eval1) == len(eval2) > 0 and eval1[-1]["val_pairs"] == eval2[-1]["val_pairs"] == 3
    for a, b in zip(eval1, eval2):
        for key in METRICS:
            assert b[f"val_{key}"] == pytest.approx(a[f"val_{key}"], rel=1e-5, abs=1e-7), (a["step"], key)
    a1 = load_file(str(one / "adapter" / "adapter_model.safetensors"))
    a2 = load_file(str(two / "adapter" / "adapter_model.safetensors"))
    assert a1.keys() == a2.keys() and len(a1) > 0
    for k in a1:
        assert torch.allclose(a2[k], a1[k], rtol=1e-4, atol=1e-6), k


def test_dpo_under_torchrun_is_the_one_process_run(sft_model, one_process, tmp_path):
    model, pairs, cache = sft_model
    two = tmp_path / "two"
    proc = dpo(model, pairs, two, cache, processes=2, batch_size=1)
    assert proc.stdout.count("== qwen-tune stage 3") == 1               # only rank 0 prints
    assert proc.stdout.count("held-out before:") == 1 and proc.stdout.count("held-out after:") == 1
    assert "1 x 2 pairs on each of 2 processes" in proc.stdout
    assert (two / "merged" / "config.json").is_file() and (two / "run.json").is_file()
    assert_same_run(two, one_process)


@pytest.mark.slow
def test_precomputed_reference_under_torchrun_is_the_same_run(sft_model, one_process, tmp_path):
    """Every rank computes the reference log-probs before training (from the adapters-off model,
    before the adapter is broadcast): the same run as the one-process adapters-off reference."""
    model, pairs, cache = sft_model
    two = tmp_path / "two"
    proc = dpo(model, pairs, two, cache, "--reference", "precomputed", "--no-merge", processes=2, batch_size=1)
    assert proc.stdout.count("reference log-probs computed once") == 1
    assert_same_run(two, one_process)
