"""examples/grpo.py end to end on a tiny model (text prompts, a FILE.py:NAME reward): the same
command twice samples the same completions (completions.jsonl) and trains the same adapter; the
run under torchrun (2 CPU processes, 1 x 2 completions each) equals the one-process run (2 x 2);
bad input exits 2 with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.examples.conftest import EXAMPLES, ROOT, assert_usage_error, run_script
from tests.helpers import tiny_checkpoint

REWARD = '''
def even_share(prompts, completions, completion_ids=None, answer=None, **columns):
    """The share of even token ids, plus 1 when the completion holds the answer column's text."""
    return [sum(t % 2 == 0 for t in ids) / len(ids) + float(a in c) for ids, c, a in zip(completion_ids, completions, answer)]
'''
COMMON = ("--max-steps", "2", "--lr", "1e-2", "--lora-r", "4", "--lora-dropout", "0", "--dtype", "fp32",
          "--warmup-steps", "0", "--num-generations", "2", "--max-completion-length", "4", "--max-len", "32",
          "--sample-prompts", "0", "--log-completions", "--no-merge", "--temperature", "1.0", "--seed", "3")
DROP = ("tokens_per_s", "peak_mem", "peak_mem_kind", "time", "entropy")   # entropy: a mean per micro-batch


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from models.qwen import Tokenizer

    tmp = tmp_path_factory.mktemp("grpo")
    model, _ = tiny_checkpoint(tmp / "model", vocab_size=151936, tie_word_embeddings=True, hidden_size=16,
                               intermediate_size=32, num_attention_heads=2, num_key_value_heads=1)
    Tokenizer.default().save_pretrained(model)
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Count to {i}:", "answer": str(i)}) + "\n" for i in range(6)),
                       encoding="utf-8")
    (tmp / "my_reward.py").write_text(REWARD, encoding="utf-8")
    return model, prompts, f"{tmp / 'my_reward.py'}:even_share", tmp


def grpo(setup, out, *extra, processes=1, batch_size=2):
    model, prompts, reward, tmp = setup
    args = ["--model", model, "--data", prompts, "--reward", reward, "--out", out, "--batch-size", str(batch_size),
            "--grad-accum", "2", *COMMON, *extra]
    if processes == 1:
        proc = run_script("grpo.py", *args, cache=tmp / "cache")
    else:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", QWEN_TUNE_DIST_TIMEOUT="60",
                   QWEN_TUNE_CACHE=str(tmp / "cache"), PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               str(EXAMPLES / "grpo.py"), *map(str, args)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def metrics(out):
    return [{k: v for k, v in json.loads(line).items() if k not in DROP}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def first(setup):
    return grpo(setup, setup[3] / "first")


def test_same_command_twice_samples_the_same_completions(setup, first):
    second = grpo(setup, setup[3] / "second")
    text = (first / "completions.jsonl").read_text()
    assert text == (second / "completions.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines()]
    assert len(rows) == 2 * 4 and {r["step"] for r in rows} == {1, 2}
    assert set(rows[0]) == {"step", "prompt", "completion", "completion_ids", "rewards", "reward", "advantage"}
    assert all(r["reward"] == pytest.approx(r["rewards"]["even_share"]) for r in rows)
    assert metrics(first) == metrics(second)
    row = metrics(first)[-1]
    for key in ("reward", "reward_std", "rewards/even_share/mean", "completions/mean_length",
                "completions/clipped_ratio", "clip_ratio/region_mean", "loss", "lr"):
        assert key in row, key
    a = load_file(first / "adapter" / "adapter_model.safetensors")
    b = load_file(second / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_two_processes_equal_one(setup, first):
    two = grpo(setup, setup[3] / "two", processes=2, batch_size=1)
    assert (two / "completions.jsonl").read_text() == (first / "completions.jsonl").read_text()
    for r1, r2 in zip(metrics(first), metrics(two)):
        assert set(r1) == set(r2)
        for k, v in r1.items():
            if isinstance(v, float) and k != "grad_norm":
                assert r2[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
    a = load_file(first / "adapter" / "adapter_model.safetensors")
    b = load_file(two / "adapter" / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)


def test_bad_input_exits_2_with_one_line(setup):
    model, prompts, reward, tmp = setup
    proc = run_script("grpo.py", "--model", model, "--data", prompts, "--reward", reward, "--out", tmp / "bad",
                      "--batch-size", "3", "--grad-accum", "1", "--num-generations", "2", cache=tmp / "cache")
    assert_usage_error(proc, "--batch-size 3", "--num-generations 2", "multiple")
    proc = run_script("grpo.py", "--model", model, "--data", prompts, "--reward", "nonsense", "--out", tmp / "bad",
                      cache=tmp / "cache")
    assert_usage_error(proc, "--reward", "nonsense", "FILE.py:NAME")
