"""train.kto against TRL 1.16's KTOTrainer._compute_loss, called on a stub trainer whose model
returns fixed per-token log-probs (precomputed reference log-probs in the batch): loss,
gradient w.r.t. the policy's log-probs, KL baseline and the logged metrics."""

from __future__ import annotations

import types
from collections import defaultdict

import pytest
import torch

from tests.helpers import assert_close_to_reference
from train.kto import kto_kl, kto_loss

pytest.importorskip("trl")

B, T = 6, 8


def fixed(seed, dtype, all_desirable=False):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(T)[None] >= torch.tensor([2, 3, 1, 4, 2, 5])[:, None]).long()  # prompt, then completion
    per_token = lambda: (-torch.rand(B, T - 1, generator=g, dtype=torch.float64) * 2 * mask[:, 1:]).to(dtype)
    policy, policy_kl = per_token(), per_token()
    ref = (policy.sum(-1) + torch.randn(B, generator=g, dtype=torch.float64) * 2).to(dtype)
    ref_kl = (policy_kl.sum(-1) - torch.rand(B, generator=g, dtype=torch.float64) * 1.5).to(dtype)
    labels = torch.ones(B, dtype=torch.bool) if all_desirable else torch.tensor([1, 0, 0, 1, 1, 0], dtype=torch.bool)
    return policy, policy_kl, ref, ref_kl, labels, mask


def trl_kto(policy, policy_kl, ref, ref_kl, labels, mask, loss_type, beta, wd, wu):
    from trl import KTOTrainer

    policy = policy.clone().requires_grad_(True)
    ids, kl_ids = torch.ones(B, T, dtype=torch.long), torch.ones(B, T, dtype=torch.long)

    def model(**kwargs):
        out = policy if kwargs["input_ids"] is ids else policy_kl
        return types.SimpleNamespace(log_probs=out, entropy=torch.zeros(B, T - 1), mean_logits=torch.zeros(B, T - 1))

    stub = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), loss_type=loss_type, beta=beta, desirable_weight=wd,
        undesirable_weight=wu, calculate_KL=loss_type == "kto", precompute_ref_logps=True, aux_loss_enabled=False,
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda t: t),
        _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    stub._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, stub)
    batch = {"input_ids": ids, "attention_mask": torch.ones(B, T, dtype=torch.long), "completion_mask": mask,
             "label": labels, "ref_logps": ref, "KL_input_ids": kl_ids,
             "KL_attention_mask": torch.ones(B, T, dtype=torch.long), "KL_completion_mask": mask,
             "ref_KL_logps": ref_kl}
    loss = KTOTrainer._compute_loss(stub, model, batch, return_outputs=False)
    (grad,) = torch.autograd.grad(loss, policy)
    return loss.detach(), grad, {k: v[-1] for k, v in stub._metrics["train"].items() if k != "num_tokens"}


def ours(policy, policy_kl, ref, ref_kl, labels, mask, loss_type, beta, wd, wu):
    policy = policy.clone().requires_grad_(True)
    kl = kto_kl(policy_kl.sum(-1), ref_kl) if loss_type == "kto" else None
    losses, metrics = kto_loss(policy.sum(-1), ref, labels, kl, beta=beta, desirable_weight=wd,
                               undesirable_weight=wu, loss_type=loss_type)
    loss = losses.mean()
    (grad,) = torch.autograd.grad(loss, policy)
    return loss.detach(), grad, metrics


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("all_desirable", [False, True])
def test_kto_loss_matches_trl(loss_type, all_desirable):
    args = dict(loss_type=loss_type, beta=0.3, wd=1.0, wu=1.7)
    x32 = fixed(0, torch.float32, all_desirable)
    ref32, ref64 = trl_kto(*x32, **args), trl_kto(*fixed(0, torch.float64, all_desirable), **args)
    got = ours(*x32, **args)
    assert_close_to_reference(got[0], ref32[0], ref64[0], what="loss")
    assert_close_to_reference(got[1], ref32[1], ref64[1], what="d loss / d policy log-probs")
    # entropy and logits/*: statistics of the model's outputs, not of the loss (the stub's are 0)
    want = {k: v for k, v in ref32[2].items() if k != "entropy" and not k.startswith("logits/")}
    assert set(got[2]) == set(want)
    for key, value in want.items():
        assert got[2][key].item() == pytest.approx(value, rel=1e-5, abs=1e-6), key
    if loss_type == "kto":
        assert want["kl"] > 0, "the KL baseline is exercised (not clamped to 0)"


def test_kl_is_clamped_and_detached():
    p = torch.tensor([-3.0, -1.0], requires_grad=True)
    assert kto_kl(p, torch.tensor([-1.0, -1.0])).item() == 0.0
    z = kto_kl(p, torch.tensor([-5.0, -2.0]))
    assert z.item() == pytest.approx(1.5) and not z.requires_grad
    with pytest.raises(ValueError, match="needs the KL baseline"):
        kto_loss(p, p.detach(), torch.tensor([True, False]))
