"""train.AdamW against torch.optim.AdamW, param groups, and the schedule against torch's schedulers."""

import math

import pytest
import torch
from torch import nn

from models.qwen import Qwen, QwenConfig
from tests.helpers import DEVICES, max_rel_err
from train import AdamW, cosine_warmup, learning_rate, param_groups, resolve_warmup
from train.checkpoint import load_tensors, optimizer_from_files, optimizer_to_files, save_tensors


def tiny_qwen(**kw) -> Qwen:
    torch.manual_seed(0)
    return Qwen(QwenConfig.preset("tiny", vocab_size=64, **kw))


def grads_for(params, step, seed=0):
    """Deterministic pseudo-gradients, different scale per tensor and step (on each parameter's device)."""
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    return [(torch.randn(p.shape, generator=g) * (0.1 + i % 3)).to(p.device) for i, p in enumerate(params)]


def clone_groups(model, groups_spec):
    """The same group layout over `model`'s parameters, for the reference optimizer."""
    named = dict(model.named_parameters())
    return [{**{k: v for k, v in g.items() if k not in ("params", "names")}, "params": [named[n] for n in g["names"]]}
            for g in groups_spec]


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("device", DEVICES)
def test_adamw_matches_torch_over_200_steps_with_groups_and_decay(device, foreach):
    ours_model, ref_model = tiny_qwen().to(device), tiny_qwen().to(device)
    groups = param_groups(ours_model, weight_decay=0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    groups[1]["lr"] = 3e-3          # per-group hyper-parameters
    groups[1]["betas"] = (0.8, 0.99)
    ours = AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1, foreach=foreach)
    ref = torch.optim.AdamW(clone_groups(ref_model, groups), lr=1e-2, betas=(0.9, 0.95), eps=1e-6,
                            weight_decay=0.1, foreach=False)
    ours_params = [p for g in ours.param_groups for p in g["params"]]
    ref_params = [p for g in ref.param_groups for p in g["params"]]
    for step in range(200):
        for p, q, gr in zip(ours_params, ref_params, grads_for(ours_params, step)):
            p.grad, q.grad = gr.clone(), gr.clone()
        ours.step()
        ref.step()
    for (n, p), q in zip(((n, p) for g in ours.param_groups for n, p in zip(g["names"], g["params"])), ref_params):
        assert max_rel_err(p, q) <= 1e-6, n
    # and the state is the reference's too
    for p, q in zip(ours_params, ref_params):
        assert max_rel_err(ours.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"]) <= 1e-6


@pytest.mark.parametrize("foreach", [True, False])
def test_adamw_zero_gradient_steps_match_torch(foreach):
    """An unrouted MoE expert's adapter: a gradient of exactly zero in some steps. torch.optim.AdamW
    still steps it (decay, moments, step count); ours must do the same, bit for bit in the
    zero-at-init case (B = 0 stays exactly 0 after zero-gradient steps)."""
    torch.manual_seed(0)
    init = [torch.zeros(6, 2), torch.randn(6, 2), torch.randn(4, 3)]   # a fresh B, a moved B, an A
    ours_p = [nn.Parameter(t.clone()) for t in init]
    ref_p = [nn.Parameter(t.clone()) for t in init]
    ours = AdamW(ours_p, lr=1e-2, weight_decay=0.1, foreach=foreach)
    ref = torch.optim.AdamW(ref_p, lr=1e-2, weight_decay=0.1, foreach=False)
    routed = [[False, False, True], [True, False, True], [False, True, False], [False, False, False]]
    for step, row in enumerate(routed):        # which parameters see a token in each step
        for p, q, gr, hit in zip(ours_p, ref_p, grads_for(ours_p, step), row):
            p.grad, q.grad = gr * hit, gr * hit
        ours.step()
        ref.step()
        if step == 0:
            assert torch.equal(ours_p[0].detach(), torch.zeros(6, 2))   # zero grad, zero weight: no move
        for p, q in zip(ours_p, ref_p):
            # elementwise ops only, no reductions: a few fp32 ulps (2**-23 = 1.2e-7) apart at most
            assert max_rel_err(p, q) <= 8 * 2.0**-23, step
    assert all(ours.state[p]["step"] == len(routed) for p in ours_p)


def test_adamw_bf16_params_keep_fp32_state_and_master():
    torch.manual_seed(0)
    w16 = nn.Parameter(torch.randn(8, 16).to(torch.bfloat16))
    w32 = nn.Parameter(w16.detach().float())
    ours = AdamW([w16], lr=1e-3, weight_decay=0.01)
    ref = torch.optim.AdamW([w32], lr=1e-3, weight_decay=0.01)
    for step in range(50):
        g = grads_for([w32], step)[0]
        w32.grad, w16.grad = g.clone(), g.to(torch.bfloat16)
        w32.grad = w16.grad.float()       # the reference sees the same (bf16-rounded) gradient
        ours.step()
        ref.step()
    state = ours.state[w16]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == state["master"].dtype == torch.float32
    assert max_rel_err(state["master"], w32) <= 1e-6
    assert torch.equal(w16.detach(), w32.detach().to(torch.bfloat16))   # one rounding of the master


def test_adamw_state_dict_roundtrip_through_safetensors_continues_identically(tmp_path):
    a_model, b_model = tiny_qwen(), tiny_qwen()
    a = AdamW(param_groups(a_model, 0.1), lr=1e-2)
    b = AdamW(param_groups(b_model, 0.1), lr=1e-2)
    pa, pb = list(a_model.parameters()), list(b_model.parameters())
    for step in range(10):
        for p, gr in zip(pa, grads_for(pa, step)):
            p.grad = gr
        a.step()
    tensors, meta = optimizer_to_files(a)
    save_tensors(tmp_path / "opt.safetensors", tensors)
    with torch.no_grad():
        for p, q in zip(pa, pb):
            q.copy_(p)
    b.load_state_dict(optimizer_from_files(load_tensors(tmp_path / "opt.safetensors"), meta, b, tmp_path / "opt.safetensors"))
    for step in range(10, 20):
        for p, q, gr in zip(pa, pb, grads_for(pa, step)):
            p.grad, q.grad = gr.clone(), gr.clone()
        a.step()
        b.step()
    assert all(torch.equal(p, q) for p, q in zip(pa, pb))


def test_param_groups_no_decay_for_biases_norms_and_1d():
    model = tiny_qwen(tie_word_embeddings=True)
    groups = param_groups(model, weight_decay=0.05)
    decay, keep = groups
    assert all(model.get_parameter(n).dim() >= 2 for n in decay["names"])
    assert all(not n.endswith("bias") and "norm" not in n for n in decay["names"])
    assert any(n.endswith("q_proj.bias") for n in keep["names"]) and "model.norm.weight" in keep["names"]
    assert all(model.get_parameter(n).dim() == 1 for n in keep["names"])
    # the tied head/embedding is one parameter: it appears once
    everything = decay["names"] + keep["names"]
    assert len(everything) == len(set(id(model.get_parameter(n)) for n in everything))
    assert len(everything) == len(list(model.parameters()))
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(model, 0.1)


def test_adamw_rejects_bad_hyperparameters():
    p = [nn.Parameter(torch.zeros(2))]
    for kw, word in [({"lr": -1}, "lr"), ({"betas": (0.9, 1.0)}, "betas"), ({"weight_decay": -0.1}, "weight_decay"),
                     ({"eps": -1e-8}, "eps")]:
        with pytest.raises(ValueError, match=word):
            AdamW(p, **kw)


# ---------------------------------------------------------------------- schedule
def hf_schedule(schedule, total, warmup, peak, min_lr):
    """transformers' scheduler of `schedule` (what the HF Trainer builds for lr_scheduler_type),
    stepped once per optimizer step: the lr of every update, the first one included."""
    from transformers import optimization as hf

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=peak)
    if schedule == "cosine" and min_lr:
        sched = hf.get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, total, min_lr=min_lr)
    elif schedule == "cosine":
        sched = hf.get_cosine_schedule_with_warmup(opt, warmup, total)
    elif schedule == "linear":
        sched = hf.get_linear_schedule_with_warmup(opt, warmup, total)
    elif schedule == "constant_with_warmup":
        sched = hf.get_constant_schedule_with_warmup(opt, warmup)
    else:
        sched = hf.get_constant_schedule(opt)
    lrs = []
    for _ in range(total + 1):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant_with_warmup", "constant"])
@pytest.mark.parametrize("total,warmup_steps,ratio,min_lr", [
    (100, 10, None, 0.0), (57, None, 0.1, 1e-5), (40, None, 0.0, 2e-5), (30, 0, None, 0.0), (25, None, 0.03, 0.0),
    (9, 1, None, 0.0),
])
def test_schedule_matches_transformers_at_every_step(schedule, total, warmup_steps, ratio, min_lr):
    """Every step's lr equals transformers' get_*_schedule_with_warmup, the first one (0 under a
    warm-up) included. Bound: both compute the same float64 expression up to the order of two
    or three roundings: measured max 1.8e-16 x peak over these cases (1 ulp); the bound is 1e-15 (a wrong step or an
    off-by-one warm-up differs by peak / warmup, >= 1e-2 relative here)."""
    if min_lr and schedule != "cosine":
        min_lr = 0.0   # transformers has a min-lr variant of the cosine only
    warmup = resolve_warmup(total, steps=warmup_steps, ratio=ratio)
    if ratio is not None:
        assert warmup == math.ceil(ratio * total)
    peak = 3e-4
    ref = hf_schedule(schedule, total, warmup, peak, min_lr)
    ours = [learning_rate(s, schedule=schedule, warmup=warmup, total=total, peak_lr=peak, min_lr=min_lr)
            for s in range(total + 1)]
    for s, (a, b) in enumerate(zip(ours, ref)):
        assert abs(a - b) <= 1e-15 * peak, (s, a, b)
    if warmup and schedule != "constant":
        assert ours[0] == 0.0 and 0 < ours[1] and ours[warmup] == pytest.approx(peak)
    if schedule in ("cosine", "linear"):
        assert ours[-1] == pytest.approx(min_lr, abs=1e-15)
        assert cosine_warmup(total + 5, warmup=warmup, total=total, peak_lr=peak, min_lr=min_lr) == min_lr \
            or schedule == "linear"


def test_schedule_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="warmup"):
        cosine_warmup(0, warmup=11, total=10, peak_lr=1.0)
    with pytest.raises(ValueError, match="total"):
        cosine_warmup(0, warmup=0, total=0, peak_lr=1.0)
    with pytest.raises(ValueError, match="not both"):
        resolve_warmup(10, steps=1, ratio=0.1)
    with pytest.raises(ValueError, match="warmup_ratio"):
        resolve_warmup(10, ratio=1.5)
