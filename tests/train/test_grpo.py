"""train.grpo against TRL 1.16's own GRPOTrainer code: the loss, its gradient and the logged
metrics from GRPOTrainer._compute_loss (called on a stub trainer whose
_get_per_token_logps_and_entropies returns fixed tensors), and the advantages as
_generate_and_score_completions computes them (its expressions with trl's own nanstd)."""

from __future__ import annotations

import itertools
import types
from collections import defaultdict

import pytest
import torch

from tests.helpers import assert_close_to_reference
from train.grpo import LOSS_TYPES, group_advantages, grpo_loss, reward_table, weighted_rewards

B, C, MAX_LEN = 6, 7, 9


def fixed_inputs(seed=0, beta=0.0, iterations=1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 3, 5, 1, 6, 4])
    mask = (torch.arange(C)[None] < lengths[:, None]).long()
    logps = -torch.rand(B, C, generator=g, dtype=torch.float64) * 3
    # a row-wide drift too, so that sequence-level ratios (GSPO) leave the clip range as well
    drift = (torch.randn(B, C, generator=g, dtype=torch.float64) * 0.3
             + torch.randn(B, 1, generator=g, dtype=torch.float64) * 0.4)
    old = logps + drift if iterations > 1 else None
    ref = logps + torch.randn(B, C, generator=g, dtype=torch.float64) * 0.5 if beta else None
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    adv[2] = 0.0
    entropies = torch.rand(B, C, generator=g, dtype=torch.float64) * 2
    return logps, old, ref, adv, mask, entropies


def trl_loss(logps, old, ref, adv, mask, entropies, loss_type, level, beta, grad_accum, n_items):
    """GRPOTrainer._compute_loss on a stub holding the attributes it reads (one process)."""
    pytest.importorskip("trl")
    from trl import GRPOTrainer

    logps = logps.clone().requires_grad_(True)
    acc = types.SimpleNamespace(num_processes=1, reduce=lambda t, reduction: t, gather=lambda t: t,
                                gather_for_metrics=lambda t: t)
    stub = types.SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta,
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=grad_accum),
        loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, use_vllm=False,
        vllm_importance_sampling_correction=False, model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=grad_accum, max_completion_length=MAX_LEN, accelerator=acc,
        _entropy_bonus_enabled=False, aux_loss_enabled=False, _metrics={"train": defaultdict(list)},
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, entropies, None))
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, C, dtype=torch.long), "completion_mask": mask, "advantages": adv,
              "num_items_in_batch": torch.tensor(float(n_items), dtype=logps.dtype)}
    if old is not None:
        inputs["old_per_token_logps"] = old
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    loss = GRPOTrainer._compute_loss(stub, None, inputs)
    (grad,) = torch.autograd.grad(loss, logps)
    return loss.detach(), grad, {k: v[-1] for k, v in stub._metrics["train"].items()}


def ours(logps, old, ref, adv, mask, entropies, loss_type, level, beta, grad_accum, n_items):
    logps = logps.clone().requires_grad_(True)
    loss, metrics = grpo_loss(logps, old, ref, adv, mask, loss_type=loss_type, importance_sampling_level=level,
                              epsilon=0.2, epsilon_high=0.28, beta=beta, max_completion_length=MAX_LEN,
                              num_items_in_batch=n_items, grad_accum=grad_accum, entropies=entropies)
    (grad,) = torch.autograd.grad(loss, logps)
    return loss.detach(), grad, metrics


CASES = list(itertools.product(LOSS_TYPES, ["token", "sequence"], [0.0, 0.04], [1, 3]))


@pytest.mark.parametrize("loss_type, level, beta, iterations", CASES)
def test_grpo_loss_gradient_and_metrics_match_trl(loss_type, level, beta, iterations):
    logps, old, ref, adv, mask, ent = fixed_inputs(seed=iterations, beta=beta, iterations=iterations)
    # dapo: the accumulated batch holds this micro-batch and another of 17 tokens (grad_accum 2)
    args = dict(loss_type=loss_type, level=level, beta=beta, grad_accum=2, n_items=int(mask.sum()) + 17)
    # the reference in fp32 (TRL's code on fp32 tensors) and in float64 (its floor); ours in fp32
    f32 = [t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
           for t in (logps, old, ref, adv, mask, ent)]
    ref32, ref64 = trl_loss(*f32, **args), trl_loss(logps, old, ref, adv, mask, ent, **args)
    got = ours(*f32, **args)
    assert got[0].dtype == torch.float32
    assert_close_to_reference(got[0], ref32[0], ref64[0], what="loss")
    assert_close_to_reference(got[1], ref32[1], ref64[1], what="d loss / d logps")
    assert got[1].abs().sum() > 0
    assert set(ref32[2]) == set(got[2]), "the same metrics"
    for key, value in ref32[2].items():
        if key.startswith("clip_ratio/"):
            # counts of clipped tokens (rows) over counts, the same expression on the same 0/1
            # indicators: equal exactly unless a ratio sits within rounding of a clip bound, which
            # the float64 run would then disagree on too (TRL's .float() makes the indicators fp32 in
            # its float64 run as well, so all three are the same fp32 fraction)
            assert got[2][key].item() == value == ref64[2][key], key
        else:   # kl, entropy: masked means, within the floor of TRL's float64 run
            assert_close_to_reference(got[2][key], torch.tensor(value), torch.tensor(ref64[2][key], dtype=torch.float64),
                                      what=key)
    if iterations > 1:
        assert ref32[2]["clip_ratio/region_mean"] > 0, "some ratios are clipped: the clip branch is exercised"


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_group_advantages_match_trl(scale_rewards):
    pytest.importorskip("trl")
    from trl.trainer.utils import nanstd

    G = 4
    per_function = torch.tensor([[1.0, 0.5], [0.0, float("nan")], [1.0, 0.2], [0.0, 0.1],
                                 [1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0],   # ties: std 0
                                 [float("nan"), float("nan")], [2.0, 0.0], [0.0, 3.0], [1.0, float("nan")]])
    weights = torch.tensor([1.0, 0.5])
    # TRL 1.16 grpo_trainer.py, _generate_and_score_completions, sum_then_normalize:
    unscorable = torch.isnan(per_function).all(dim=1)
    rewards = (per_function * weights.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable] = torch.nan
    mean = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    if scale_rewards in ["group", "none"]:
        std = nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    else:
        std = nanstd(rewards).expand_as(rewards)
    want = rewards - mean
    if scale_rewards != "none":
        want = want / (std + 1e-4)
    want = torch.nan_to_num(want, nan=0.0)

    got_rewards = weighted_rewards(per_function, weights)
    assert torch.equal(torch.isnan(got_rewards), torch.isnan(rewards))
    got = group_advantages(got_rewards, G, scale_rewards)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)
    assert torch.equal(got[4:8], torch.zeros(4)), "a group of ties has no advantage"
    assert got[8] == 0.0, "an unscorable completion has no advantage"


def test_a_group_of_one_has_zero_std():
    rewards = torch.tensor([0.5, 2.0, -1.0])
    # TRL: with num_generations == 1, std_rewards = zeros; each completion is its own group's mean
    assert torch.equal(group_advantages(rewards, 1, "group"), torch.zeros(3))
    assert torch.allclose(group_advantages(rewards, 3, "none"), rewards - rewards.mean())


def test_bad_arguments_are_named():
    logps, _, _, adv, mask, _ = fixed_inputs()
    with pytest.raises(ValueError, match="loss_type='ppo'"):
        grpo_loss(logps, None, None, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(logps, None, None, adv, mask, beta=0.1, num_items_in_batch=10)
    with pytest.raises(ValueError, match="num_items_in_batch"):
        grpo_loss(logps, None, None, adv, mask)
    with pytest.raises(ValueError, match="G=4"):
        group_advantages(torch.zeros(6), 4)


def test_defaults_are_trl_grpo_configs():
    import inspect

    pytest.importorskip("trl")
    from trl import GRPOConfig

    fields = GRPOConfig.__dataclass_fields__
    params = inspect.signature(grpo_loss).parameters
    for ours_name, trl_name in [("loss_type", "loss_type"), ("importance_sampling_level", "importance_sampling_level"),
                                ("epsilon", "epsilon"), ("epsilon_high", "epsilon_high"), ("beta", "beta")]:
        assert params[ours_name].default == fields[trl_name].default, ours_name
    assert inspect.signature(group_advantages).parameters["scale_rewards"].default == fields["scale_rewards"].default


def test_reward_table_calls_functions_as_trl_and_warns_on_unscored():
    def length(prompts, completions, completion_ids=None, **columns):
        return [None if c == "skip" else float(len(c)) for c in completions]

    def has_answer(prompts, completions, completion_ids=None, answer=None, **columns):
        return [None if a is None else float(a in c) for c, a in zip(completions, answer)]

    with pytest.warns(UserWarning, match="completion 2"):
        table = reward_table([length, has_answer], ["p"] * 3, ["a7", "b", "skip"], answer=["7", "8", None])
    assert torch.equal(torch.isnan(table), torch.tensor([[False, False], [False, False], [True, True]]))
    assert table[:2].tolist() == [[2.0, 1.0], [1.0, 0.0]]

    def three(prompts, completions, completion_ids=None, **columns):
        return [1.0, 1.0, 1.0]

    with pytest.raises(ValueError, match="'three' returned 3 rewards for 2 completions"):
        reward_table([three], ["p"] * 2, ["a", "b"])
