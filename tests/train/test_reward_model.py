"""The reward model against its references: scores against transformers' ...ForSequenceClassification
(our loader on its folder, transformers on the folder we write), the Bradley-Terry loss, metrics and
gradients against TRL 1.16's RewardTrainer.compute_loss (TRL's own code, run on a stand-in trainer),
and reward_function against TRL's GRPOTrainer scoring recipe (TRL's apply_chat_template, the HF
tokenizer, right padding, logits[:, 0]). Tolerances: the reference's own fp32-vs-float64 error."""

from __future__ import annotations

import collections
import types

import pytest
import torch

from tests.helpers import (TINY_QWEN2, assert_close_to_reference, assert_grads_close, float64_twin, hf_config,
                           random_ids)

PAD = 0


def hf_classifier(kind: str = "qwen2", seed: int = 0, **overrides):
    """A tiny random transformers ...ForSequenceClassification (num_labels 1), biases and norms randomised."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    cfg = hf_config(kind, num_labels=1, pad_token_id=overrides.pop("pad_token_id", PAD), **overrides)
    model = AutoModelForSequenceClassification.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def padded_batch(rows: int = 4, length: int = 10, seed: int = 0):
    """Right-padded ids (rows of different lengths, PAD never inside a row) and their mask."""
    ids = random_ids(rows, length, seed=seed).clamp_min(1)
    mask = torch.ones_like(ids)
    for i in range(rows):
        cut = length - (i * 3) % (length - 2)
        ids[i, cut:] = PAD
        mask[i, cut:] = 0
    return ids, mask


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_scores_match_transformers_both_ways(kind, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from models.qwen import load, save
    from models.qwen.score import QwenForSequenceClassification

    hf = hf_classifier(kind)
    hf.save_pretrained(tmp_path / "hf")
    ours = load(tmp_path / "hf")
    assert isinstance(ours, QwenForSequenceClassification)
    ids, mask = padded_batch()
    left = torch.roll(ids, 3, dims=1)   # pads at both ends: the rightmost non-pad token is scored
    with torch.no_grad():
        for x, m in ((ids, mask), (ids, None), (left, None)):
            mine = ours(x, attention_mask=m)
            ref32 = hf(x, attention_mask=m).logits
            ref64 = float64_twin(hf)(x, attention_mask=m).logits
            assert mine.shape == (x.shape[0], 1)
            assert_close_to_reference(mine, ref32, ref64, what=f"{kind} scores")

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # (no tokenizer files in this folder)
        save(ours, tmp_path / "ours")
    back = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    assert type(back).__name__ == type(hf).__name__ and back.config.num_labels == 1
    with torch.no_grad():
        mine = ours(ids, attention_mask=mask)
        assert_close_to_reference(mine, back(ids, attention_mask=mask).logits,
                                  float64_twin(back)(ids, attention_mask=mask).logits, what="written folder")


def trl_compute_loss(model, inputs, coefficient):
    """TRL 1.16's RewardTrainer.compute_loss itself, on a stand-in for the trainer (one process)."""
    from trl import RewardTrainer

    accel = types.SimpleNamespace(gather=lambda t: t, gather_for_metrics=lambda t: t)
    stub = types.SimpleNamespace(model=model, args=types.SimpleNamespace(center_rewards_coefficient=coefficient),
                                 accelerator=accel, _metrics={"train": collections.defaultdict(list)},
                                 _total_train_tokens=0, _tp_size=1)
    loss = RewardTrainer.compute_loss(stub, model, dict(inputs))
    return loss, {k: v[-1] for k, v in stub._metrics["train"].items()}


@pytest.mark.parametrize("coefficient,with_margin", [(None, False), (0.05, True)])
def test_loss_metrics_and_gradients_match_trl_reward_trainer(coefficient, with_margin, tmp_path):
    from models.qwen import load
    from train.reward_model import RewardObjective

    hf = hf_classifier()
    hf.save_pretrained(tmp_path / "hf")
    ours = load(tmp_path / "hf")
    # Scores spread out, so that the loss and accuracy are not all at their values for 0 rewards.
    with torch.no_grad():
        hf.score.weight.mul_(40)
        ours.score.weight.mul_(40)
    ids, mask = padded_batch(rows=6, seed=1)
    margin = torch.tensor([0.5, -0.25, 1.0]) if with_margin else None
    inputs = {"input_ids": ids, "attention_mask": mask, **({"margin": margin} if with_margin else {})}
    hf.train(), ours.train()   # (dropout is 0 in these models; train mode as in training)
    twin = float64_twin(hf)
    ref32, trl_metrics = trl_compute_loss(hf, inputs, coefficient)
    ref64, _ = trl_compute_loss(twin, {**inputs, **({"margin": margin.double()} if with_margin else {})}, coefficient)
    objective = RewardObjective(center_rewards_coefficient=coefficient)
    batch = dict(inputs)
    loss_sum, metrics = objective(ours, batch)
    B = objective.count(batch)
    loss = loss_sum / B
    assert_close_to_reference(loss.detach(), ref32.detach(), ref64.detach(), what="loss")
    for loss_ in (loss, ref32, ref64):
        loss_.backward()
    assert_grads_close(ours, hf, twin)
    assert float(metrics["accuracy"]) == round(trl_metrics["accuracy"] * B)   # pairs ranked right (TRL: an fp32 mean)
    assert 0 < trl_metrics["accuracy"] < 1
    with torch.no_grad():
        r64 = twin(ids, attention_mask=mask).logits[:, 0]
    c64, j64 = r64[:3], r64[3:]
    assert_close_to_reference(metrics["margin"] / B, torch.tensor(trl_metrics["margin"]), (c64 - j64).mean(),
                              what="margin")
    assert_close_to_reference(metrics["mean_reward"] / B, torch.tensor(trl_metrics["mean_reward"]), r64.mean(),
                              what="mean_reward")


def test_reward_function_scores_as_trl_grpo_does_text_and_chat(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl.data_utils import apply_chat_template

    from models.qwen import Tokenizer
    from models.qwen.special_tokens import ENDOFTEXT_ID
    from train.reward_model import reward_function

    folder = tmp_path / "my-rm"
    hf_classifier(vocab_size=151936, pad_token_id=ENDOFTEXT_ID, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=1).save_pretrained(folder)
    Tokenizer.default().save_pretrained(folder)
    fn = reward_function(folder)
    assert fn.__name__ == "my-rm"
    ref = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)

    def trl_rewards(model, prompts, completions):   # GRPOTrainer._calculate_rewards, reward-model branch
        if isinstance(prompts[0], list):
            texts = [apply_chat_template({"messages": p + c}, tok)["text"] for p, c in zip(prompts, completions)]
        else:
            texts = [p + c for p, c in zip(prompts, completions)]
        inputs = tok(text=texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
        with torch.no_grad():
            return model(**inputs).logits[:, 0]

    text_prompts = ["The json module", "A socket is"]
    text_completions = [" encodes objects.", " an endpoint for data over a network, usually"]
    chat_prompts = [[{"role": "user", "content": "What is TLS?"}], [{"role": "system", "content": "Be brief."},
                                                                   {"role": "user", "content": "What is a queue?"}]]
    chat_completions = [[{"role": "assistant", "content": "Encryption for sockets."}],
                        [{"role": "assistant", "content": "A first-in first-out list."}]]
    twin = float64_twin(ref)
    for prompts, completions in ((text_prompts, text_completions), (chat_prompts, chat_completions)):
        mine = torch.tensor(fn(prompts=prompts, completions=completions, completion_ids=[[1], [2]], answer=["x", "y"]))
        assert_close_to_reference(mine, trl_rewards(ref, prompts, completions), trl_rewards(twin, prompts, completions),
                                  what="reward_function")


def test_reward_function_refuses_a_causal_lm(tmp_path):
    from tests.helpers import tiny_checkpoint
    from train.reward_model import reward_function

    folder, _ = tiny_checkpoint(tmp_path / "lm", vocab_size=TINY_QWEN2["vocab_size"])
    with pytest.raises(ValueError, match="not a reward model"):
        reward_function(folder)
