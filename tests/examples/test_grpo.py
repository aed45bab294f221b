"""examples/grpo.py end to end on a tiny model (text prompts, a FILE.py:NAME reward): its outputs
(completions.jsonl rows, TRL-named metrics, the adapter); the run under torchrun (2 CPU processes,
1 x 2 completions each) equals the one-process run (2 x 2): the same completions, metrics and
adapter; bad input is a one-line usage error (exit 2). (The same command twice sampling the same
completions: tests/train/test_grpo_step.py, in-process.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.examples.conftest import EXAMPLES, ROOT, run_script
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


def test_outputs(first):
    rows = [json.loads(line) for line in (first / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 4 and {r["step"] for r in rows} == {1, 2}
    assert set(rows[0]) == {"step", "prompt", "completion", "completion_ids", "rewards", "reward", "advantage"}
    assert all(r["reward"] == pytest.approx(r["rewards"]["even_share"]) for r in rows)
    assert all(len(r["completion_ids"]) <= 4 and r["prompt"].startswith("Count to") for r in rows)
    row = metrics(first)[-1]
    for key in ("reward", "reward_std", "rewards/even_share/mean", "completions/mean_length",
                "completions/clipped_ratio", "clip_ratio/region_mean", "loss", "lr"):
        assert key in row, key
    assert (first / "adapter" / "adapter_config.json").is_file()


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


@pytest.mark.parametrize("flags, needles", [
    (["--batch-size", "3", "--grad-accum", "1", "--num-generations", "2"], ["--batch-size 3", "--num-generations 2",
                                                                           "multiple"]),
    (["--reward", "nonsense"], ["--reward", "nonsense", "FILE.py:NAME"]),
    (["--reward", "missing.py:fn"], ["--reward", "no file missing.py"]),
    (["--finetuning", "full", "--beta", "0.04"], ["--finetuning full", "--beta"]),
])
def test_bad_input_is_a_one_line_usage_error(setup, flags, needles):
    """In-process (no subprocess): main() raises UsageError (run_main prints it as one line, exit 2)
    before it loads the model or claims --out."""
    from cli.errors import UsageError, exit_code
    from examples.grpo import main

    model, prompts, reward, tmp = setup
    args = ["--model", str(model), "--data", str(prompts), "--out", str(tmp / "bad")]
    if "--reward" not in flags:
        args += ["--reward", reward]
    with pytest.raises(UsageError) as e:
        main(args + flags)
    assert exit_code(e.value) == 2 and "\n" not in str(e.value)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))
    assert not (tmp / "bad").exists()


def test_qlora_with_a_reward_model_folder_then_full_fine_tuning(setup, tmp_path, monkeypatch, capsys):
    """In-process main(), two short runs on chat prompts. (1) --qlora --beta 0.04 with two rewards: a
    reward-model folder (as examples/reward.py writes it: a Qwen2ForSequenceClassification) and a
    FILE.py:NAME. Its scores in completions.jsonl are transformers' AutoModelForSequenceClassification
    scores of TRL's text (prompt + completion messages through the folder's chat template); the
    metrics carry TRL's names with rewards/<folder>/mean and kl; adapter/ loads in PEFT and merged/ in
    transformers as that same model. (2) --finetuning full --beta 0: model/ loads in transformers,
    with weights trained away from the base."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from examples.grpo import main
    from models.qwen import Tokenizer, load, save
    from models.qwen.score import to_sequence_classifier
    from models.qwen.special_tokens import ENDOFTEXT_ID
    from tests.helpers import assert_close_to_reference, float64_twin

    model, _, reward, tmp = setup
    monkeypatch.setenv("QWEN_TUNE_CACHE", str(tmp / "cache"))
    rm = tmp_path / "judge"
    clf = to_sequence_classifier(load(model), seed=1)
    clf.config.pad_token_id = ENDOFTEXT_ID
    save(clf, rm, tokenizer=Tokenizer.default())
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"Count to {i}."}], "answer": str(i)})
                            + "\n" for i in range(4)), encoding="utf-8")
    run = ["--model", str(model), "--data", str(chat), "--batch-size", "2", "--grad-accum", "2",
           *[a for a in COMMON if a != "--no-merge"]]

    q = tmp_path / "qlora"
    assert main([*run, "--out", str(q), "--qlora", "--beta", "0.04", "--reward", str(rm), "--reward", reward]) == 0
    assert "base in NF4" in capsys.readouterr().out
    rows = [json.loads(line) for line in (q / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(set(r["rewards"]) == {"judge", "even_share"} for r in rows)
    for m in metrics(q):
        for key in ("reward", "reward_std", "rewards/judge/mean", "rewards/even_share/mean", "completions/mean_length",
                    "completions/clipped_ratio", "kl", "clip_ratio/region_mean", "loss"):
            assert key in m, key
        step_rows = [r["rewards"]["judge"] for r in rows if r["step"] == m["step"]]
        assert m["rewards/judge/mean"] == pytest.approx(sum(step_rows) / len(step_rows), rel=1e-6)

    hf_tok = AutoTokenizer.from_pretrained(rm)
    texts = [hf_tok.apply_chat_template(r["prompt"] + [{"role": "assistant", "content": r["completion"]}],
                                        tokenize=False) for r in rows]
    enc = hf_tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    judge = AutoModelForSequenceClassification.from_pretrained(rm, dtype=torch.float32).eval()
    with torch.no_grad():
        ref32 = judge(**enc).logits[:, 0]
        ref64 = float64_twin(judge)(**enc).logits[:, 0]
    assert_close_to_reference(torch.tensor([r["rewards"]["judge"] for r in rows]), ref32, ref64,
                              what="reward-model folder scores")

    adapter = load_file(q / "adapter" / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())   # it trained
    ids = hf_tok(hf_tok.apply_chat_template(rows[0]["prompt"], add_generation_prompt=True, tokenize=False),
                 add_special_tokens=False, return_tensors="pt").input_ids
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, q / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(q / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        assert_close_to_reference(merged(ids).logits, peft(ids).logits, float64_twin(peft)(ids).logits,
                                  what="merged/ against base + adapter/ in PEFT")

    f = tmp_path / "full"
    assert main([*run, "--out", str(f), "--finetuning", "full", "--beta", "0", "--reward", reward]) == 0
    assert not (f / "adapter").exists() and not (f / "merged").exists()
    assert {"reward", "rewards/even_share/mean", "clip_ratio/region_mean", "loss"} <= set(metrics(f)[-1])
    tuned = AutoModelForCausalLM.from_pretrained(f / "model", dtype=torch.float32)
    before = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).state_dict()
    assert any(not torch.equal(v, before[k]) for k, v in tuned.state_dict().items())
