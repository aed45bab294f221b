"""The GRPO step on the Trainer (train.grpo_source): one micro-batch's objective on our model against
TRL 1.16's GRPOTrainer._compute_loss on a transformers model of the same weights (loss and every
parameter gradient, floors from the transformers model's float64 twin; with old log-probs that
clip tokens both ways: the clip ratios exactly, the entropy within its floor); a run on a tiny model that
learns (its reward rises); and a --resume from a checkpoint in the middle of a generation's μ
steps that equals the uninterrupted run bit for bit (weights, metrics, completions.jsonl)."""

from __future__ import annotations

import json
import shutil
import types
from collections import defaultdict

import pytest
import torch

from models.qwen import load
from tests.helpers import (FLOOR_FACTOR, FP32_ULP, assert_close_to_reference, assert_grads_close, float64_twin,
                           random_ids, tiny_checkpoint)
from train.grpo import group_advantages
from train.grpo_source import GRPOObjective, GRPOSettings, GRPOSource, completion_slots

P, C, TEMP = 4, 5, 0.8


def per_token(model, input_ids, attention_mask, logits_to_keep, **kw):
    """(log-probs, entropies, aux) of the completion tokens from `model` through TRL's own helpers."""
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    positions = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    logits = model(input_ids, attention_mask=attention_mask, position_ids=positions).logits
    logits = logits[:, -logits_to_keep - 1:-1] / TEMP
    return selective_log_softmax(logits, input_ids[:, -logits_to_keep:]), entropy_from_logits(logits), None


def importance_weights(logps, old, mask, level):
    """TRL's coef_1: exp(logp - old) per token, or exp of its masked row mean ([B, 1], GSPO)."""
    log_ratio = logps - old
    if level == "sequence":
        return torch.exp((log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0))
    return torch.exp(log_ratio)


def trl_step(hf, ids, mask, advantages, settings, n_items, old=None):
    """GRPOTrainer._compute_loss on a stub whose log-probs come from `hf` through TRL's own helpers."""
    from trl import GRPOTrainer

    acc = types.SimpleNamespace(num_processes=1, reduce=lambda t, reduction: t, gather=lambda t: t,
                                gather_for_metrics=lambda t: t)
    stub = types.SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=settings.importance_sampling_level, beta=settings.beta,
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        loss_type=settings.loss_type, epsilon_low=settings.epsilon, epsilon_high=settings.epsilon_high,
        use_vllm=False, vllm_importance_sampling_correction=False, model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=settings.max_completion_length,
        accelerator=acc, _entropy_bonus_enabled=False, aux_loss_enabled=False, _metrics={"train": defaultdict(list)},
        _get_per_token_logps_and_entropies=per_token, temperature=TEMP)
    inputs = {"prompt_ids": ids[:, :P], "prompt_mask": mask[:, :P], "completion_ids": ids[:, P:],
              "completion_mask": mask[:, P:], "advantages": advantages,
              "num_items_in_batch": torch.tensor(float(n_items))}
    if old is not None:
        inputs["old_per_token_logps"] = old
    return GRPOTrainer._compute_loss(stub, hf, inputs), {k: v[-1] for k, v in stub._metrics["train"].items()}


@pytest.mark.parametrize("loss_type, level", [("dapo", "token"), ("grpo", "sequence")])
def test_objective_on_our_model_matches_trl_compute_loss(tmp_path, loss_type, level):
    pytest.importorskip("trl")
    path, hf = tiny_checkpoint(tmp_path / "tiny", seed=3)
    hf.train()   # dropout 0 in the tiny config: train mode changes nothing but the flag TRL reads
    ours = load(path, dtype=torch.float32)
    ids = random_ids(4, P + C, seed=5)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0        # left-padded prompt
    mask[1, P + 2:] = 0    # stopped at its EOS
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.25])
    adv = group_advantages(rewards, 2, "group")
    s = GRPOSettings(num_generations=2, max_completion_length=C, temperature=TEMP, loss_type=loss_type,
                     importance_sampling_level=level, epsilon=0.2, epsilon_high=0.28)
    n_items = int(mask[:, P:].sum())
    twin = float64_twin(hf)
    twin.train()
    # Old log-probs (as at μ > 1): the twin's own, shifted so that log(ratio) is a row's 0.5, -0.5,
    # 0.1, -0.1 (advantages +, -, +, -) ± 0.05 per token: row 0 is clipped high, row 1 low, rows 2-3
    # sit inside the clip range [0.8, 1.28], at token and at sequence level.
    cmask = mask[:, P:]
    with torch.no_grad():
        lp32, lp64 = per_token(hf, ids, mask, C)[0], per_token(twin, ids, mask, C)[0]
    noise = torch.tensor([-0.05, 0.05], dtype=torch.float64)[
        torch.randint(0, 2, (4, C), generator=torch.Generator().manual_seed(11))]
    shift = torch.tensor([0.5, -0.5, 0.1, -0.1], dtype=torch.float64)[:, None] + noise
    old = (lp64 - shift).float()
    batch = {"input_ids": ids, "attention_mask": mask, "advantages": adv, "n_prompt": torch.tensor(P),
             "num_items": torch.tensor(float(n_items), dtype=torch.float64), "micro_batches": torch.tensor(1),
             "old_logps": old}
    loss, metrics = GRPOObjective(s)(ours, batch)
    loss.backward()
    ref32, trl_metrics = trl_step(hf, ids, mask, adv, s, n_items, old=old)
    ref64, trl64_metrics = trl_step(twin, ids, mask, adv.double(), s, n_items, old=old.double())
    ref32.backward()
    ref64.backward()
    assert_close_to_reference(loss.detach(), ref32.detach(), ref64.detach(), what="loss")
    assert_grads_close(ours, hf, twin)

    # Clip ratios are counts of clipped tokens (rows, at sequence level) over a count: the same
    # expression on the same 0/1 indicators in both, so they are equal exactly when no token's
    # clipping differs. It could only differ for a ratio within rounding of a bound: every ratio
    # here is farther from 1 - ε and 1 + ε_high than (FLOOR_FACTOR + 1) x the reference's own
    # fp32-vs-float64 error of the ratios (ours is within FLOOR_FACTOR of the reference's fp32,
    # which is within one floor of the float64), so neither side can cross one. (TRL's .float()
    # makes the indicators fp32 in its float64 run too: all three are the same fp32 fraction.)
    w32, w64 = (importance_weights(lp.double(), old.double(), cmask, level) for lp in (lp32, lp64))
    keep = cmask.bool() if level == "token" else torch.ones_like(w64, dtype=torch.bool)
    ratio_floor = max(float((w32 - w64).abs()[keep].max()), FP32_ULP)
    bounds = torch.tensor([1 - s.epsilon, 1 + s.epsilon_high], dtype=torch.float64)
    margin = float((w64[keep][:, None] - bounds).abs().min())
    assert margin > (FLOOR_FACTOR + 1) * ratio_floor, (margin, ratio_floor)
    for name in ("clip_ratio/region_mean", "clip_ratio/low_mean", "clip_ratio/high_mean"):
        assert float(metrics[name]) == trl_metrics[name] == trl64_metrics[name], name
    assert trl_metrics["clip_ratio/low_mean"] > 0 and trl_metrics["clip_ratio/high_mean"] > 0, trl_metrics
    # entropy: a token mean of TRL's entropy_from_logits, floor from the float64 twin
    assert_close_to_reference(metrics["entropy"], torch.tensor(trl_metrics["entropy"]),
                              torch.tensor(trl64_metrics["entropy"], dtype=torch.float64), what="entropy")


# ---------------------------------------------------------------------- runs on the Trainer
class Tok:
    """Decodes ids as space-separated numbers (the tiny model has no tokenizer)."""

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))


LOW = 64   # of the tiny vocabulary's 320 ids


def count_target(prompts, completions, completion_ids=None, **columns):
    """The share of a completion's tokens below LOW (about 1/5 at random): a task a tiny model learns
    in a few steps."""
    return [sum(t < LOW for t in ids) / len(ids) for ids in completion_ids]


def run(path, out, *, steps, mu=1, save_every=None, resume=False, lr=3e-2, log=True):
    from train import TrainConfig, Trainer

    model = load(path, dtype=torch.float32)
    prompts = [{"prompt": f"p{i}", "prompt_ids": random_ids(1, 2 + i % 3, seed=i)[0].tolist(), "columns": {},
                "chat": False} for i in range(6)]
    s = GRPOSettings(num_generations=4, max_completion_length=6, temperature=1.0, num_iterations=mu,
                     log_completions=str(out / "completions.jsonl") if log else None)
    source = GRPOSource(prompts, [count_target], s, tokenizer=Tok(), eos_ids=[1], pad_id=0, seed=3)
    cfg = TrainConfig(out_dir=str(out), lr=lr, max_steps=steps, batch_size=4, grad_accum=2, mode="full",
                      save_every=save_every, warmup_steps=0, lr_scheduler="constant", seed=0, resume=resume,
                      grad_checkpointing=False, keep_last=10, progress="off", save_final=False)
    trainer = Trainer(model, cfg, completion_slots(len(prompts), 4), objective=GRPOObjective(s))
    source.attach(trainer)
    trainer.batch_source = source
    trainer.fit()
    run.source = source   # the last run's batch source (its buffer: the last generation's micro-batches)
    return model, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_run_learns(tmp_path):
    path, _ = tiny_checkpoint(tmp_path / "tiny", seed=1)
    _, rows = run(path, tmp_path / "run", steps=12, log=False)
    rewards = [r["reward"] for r in rows if "reward" in r]
    assert len(rewards) == 12
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert first < 0.4 and last > first + 0.3, rewards


def test_same_run_twice_samples_the_same_completions_and_resume_mid_generation_is_bit_exact(tmp_path):
    """The same run twice: the same completions.jsonl and weights. μ = 2: steps 3 and 4 train on
    generation 1; a checkpoint after step 3 carries it, and the resumed run equals the whole one."""
    path, _ = tiny_checkpoint(tmp_path / "tiny", seed=2)
    whole_model, whole_rows = run(path, tmp_path / "whole", steps=4, mu=2, save_every=3)
    again_model, _ = run(path, tmp_path / "again", steps=4, mu=2, save_every=3)
    assert (tmp_path / "again" / "completions.jsonl").read_text() == (tmp_path / "whole" / "completions.jsonl").read_text()
    assert all(torch.equal(a, b) for a, b in zip(whole_model.state_dict().values(), again_model.state_dict().values()))
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "whole", part)
    shutil.rmtree(part / "checkpoints" / "step-4")
    with open(part / "completions.jsonl", "a") as f:   # a step the interrupted run logged past its checkpoint
        f.write(json.dumps({"step": 5, "completion": "stale"}) + "\n")
    resumed_model, resumed_rows = run(path, part, steps=4, mu=2, save_every=3, resume=True)
    for (name, a), b in zip(whole_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name
    drop = ("tokens_per_s", "peak_mem", "time")
    assert [{k: v for k, v in r.items() if k not in drop} for r in whole_rows] == \
        [{k: v for k, v in r.items() if k not in drop} for r in resumed_rows]
    assert (part / "completions.jsonl").read_text() == (tmp_path / "whole" / "completions.jsonl").read_text()
    steps = [json.loads(l)["step"] for l in (part / "completions.jsonl").read_text().splitlines()]
    assert sorted(set(steps)) == [1, 3] and len(steps) == 16


def test_micro_batches_are_the_generation_shuffled_as_trl_does(tmp_path):
    """TRL's _prepare_inputs shuffles a generation's completions (shuffle_sequence_dict) before it
    splits them into micro-batches: ours hold the logged completions, each row with its own
    advantage, in a seeded order other than the generation's (one run; the same order on resume is
    covered by the bit-exact resume test)."""
    path, _ = tiny_checkpoint(tmp_path / "tiny", seed=2)
    run(path, tmp_path / "run", steps=1)
    logged = [json.loads(line) for line in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    rows = []
    for b in run.source.buffer:
        n = int(b["n_prompt"])
        for ids, m, a in zip(b["input_ids"], b["attention_mask"], b["advantages"]):
            rows.append((ids[n:][m[n:].bool()].tolist(), float(a)))
    order = [next(i for i, r in enumerate(logged) if (r["completion_ids"], r["advantage"]) == row) for row in rows]
    assert sorted(order) == list(range(len(logged))) == list(range(8))
    assert order != sorted(order)
    assert order == run.source.shuffle_order(0).tolist()
