"""inject: target selection (all-linear, suffixes, regex, Qwen-7B v1 aliases), freezing,
training only the adapters, gradient checkpointing, errors."""

from __future__ import annotations

import pytest
import torch

import lora
from tests.helpers import max_rel_err, random_ids
from tests.lora.conftest import load_ours, randomise_adapters

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


def _adapted(model):
    return set(lora.adapter_modules(model))


def _expected(leaves, layers=2):
    out = set()
    for i in range(layers):
        for leaf in leaves:
            sub = "self_attn" if leaf in ATTN else "mlp"
            out.add(f"model.layers.{i}.{sub}.{leaf}")
    return out


def test_all_linear_excludes_head_and_freezes_base(ckpt_dirs):
    model = load_ours(ckpt_dirs[False])
    base_names = {n for n, _ in model.named_parameters()}
    lora.inject(model, r=4)
    assert _adapted(model) == _expected(ATTN + MLP)
    assert type(model.lm_head) is not lora.LoRALinear
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # Base parameter names in the state dict are unchanged.
    assert base_names <= set(model.state_dict())


@pytest.mark.parametrize(
    "targets, leaves",
    [
        (["q_proj", "v_proj"], ["q_proj", "v_proj"]),
        ("q_proj", ["q_proj"]),
        (r".*\.mlp\.(gate|up)_proj", ["gate_proj", "up_proj"]),
        (["c_attn"], ["q_proj", "k_proj", "v_proj"]),  # Qwen-7B v1 names
        (["w1"], ["up_proj"]),
        (["w2"], ["gate_proj"]),
        (["mlp.c_proj"], ["down_proj"]),
        (["attn.c_proj"], ["o_proj"]),
        (["c_attn", "c_proj", "w1", "w2"], ATTN + MLP),
    ],
)
def test_targets(ckpt_dirs, targets, leaves):
    model = lora.inject(load_ours(ckpt_dirs[False]), r=2, targets=targets)
    assert _adapted(model) == _expected(leaves)


def test_regex_over_full_name(ckpt_dirs):
    model = lora.inject(load_ours(ckpt_dirs[False]), r=2, targets=r"model\.layers\.1\.self_attn\.[qk]_proj")
    assert _adapted(model) == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"}
    # Written for PEFT as explicit paths: PEFT would match a regex against transformers'
    # modules, which include some ours lack (mlp.act_fn).
    assert lora.config_of(model).target_modules == sorted(_adapted(model))
    model = lora.inject(load_ours(ckpt_dirs[False]), r=2, targets=r"model\.layers\.1\.mlp\..*")
    assert lora.config_of(model).target_modules == sorted(_expected(MLP, 2) - _expected(MLP, 1))


def test_unknown_target_lists_available(ckpt_dirs):
    model = load_ours(ckpt_dirs[False])
    with pytest.raises(ValueError, match="qkv_proj") as e:
        lora.inject(model, targets=["q_proj", "qkv_proj"])
    assert "gate_proj" in str(e.value) and "o_proj" in str(e.value)
    with pytest.raises(ValueError, match="matches no linear"):
        lora.inject(model, targets=r"nothing\..*")
    assert not lora.has_adapters(model)  # nothing half-done
    assert all(p.requires_grad for p in model.parameters())


def test_double_injection_is_an_error(ckpt_dirs):
    model = lora.inject(load_ours(ckpt_dirs[False]), r=4)
    with pytest.raises(ValueError, match="already holds LoRA adapters"):
        lora.inject(model, r=4)
    with pytest.raises(ValueError, match="already holds LoRA adapters"):
        lora.inject(model, r=8, targets=["q_proj"])


def test_bad_arguments(ckpt_dirs):
    model = load_ours(ckpt_dirs[False])
    for kwargs, word in ((dict(r=0), "r "), (dict(alpha=-1), "alpha"), (dict(dropout=1.0), "dropout")):
        with pytest.raises(ValueError, match=word):
            lora.inject(model, **kwargs)


def test_tied_head_cannot_be_a_lora_target(ckpt_dirs):
    model = load_ours(ckpt_dirs[True])
    with pytest.raises(ValueError, match="tied"):
        lora.inject(model, targets=["lm_head"])


def test_summary_counts(ckpt_dirs):
    model = load_ours(ckpt_dirs[True])
    total_before = sum(p.numel() for p in model.parameters())  # tied weight counted once
    lora.inject(model, r=4, targets=["q_proj", "down_proj"], dora=True, modules_to_save=["lm_head"])
    s = lora.summary(model)
    hidden, inter, vocab = 48, 88, 320
    per_layer = 4 * (hidden + hidden) + hidden + 4 * (inter + hidden) + hidden  # A+B+magnitude
    copy = vocab * hidden  # one shared trainable copy for the tied embedding/head
    assert s.trainable == 2 * per_layer + copy
    assert s.total == total_before + s.trainable
    assert "trainable params" in str(s) and s.adapted_modules == 4


def _loss(model, ids):
    return model(ids, labels=ids)


@pytest.mark.parametrize("dora", [False, True])
def test_only_adapters_change_under_adamw(ckpt_dirs, dora):
    model = load_ours(ckpt_dirs[True])
    lora.inject(model, r=4, alpha=8, dora=dora, modules_to_save=["embed_tokens"])
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k and "modules_to_save" not in k}
    trainable = lora.trainable_state_dict(model)
    start = {k: v.clone() for k, v in trainable.items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    for step in range(3):
        loss = _loss(model, random_ids(2, 9, seed=step))
        loss.backward()
        lora.check_gradients(model)
        for n, p in model.named_parameters():
            assert (p.grad is not None) == p.requires_grad, n
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    for k, v in frozen.items():
        assert torch.equal(after[k], v), f"frozen {k} changed"
    kinds = {"lora_A", "lora_B", "modules_to_save"} | ({"lora_magnitude_vector"} if dora else set())
    for kind in kinds:
        names = [k for k in start if kind in k]
        assert names and all(not torch.equal(trainable[k], start[k]) for k in names), kind
    assert model.is_tied or model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("order", ["checkpointing_first", "inject_first"])
def test_gradient_checkpointing_any_order(ckpt_dirs, order):
    ids = random_ids(2, 11, seed=4)

    def grads(checkpointing: bool):
        model = load_ours(ckpt_dirs[False])
        if checkpointing and order == "checkpointing_first":
            model.enable_gradient_checkpointing(True)
        torch.manual_seed(1)  # A's Kaiming init draws from the global RNG
        lora.inject(model, r=4, alpha=8, dropout=0.1, dora=True)
        randomise_adapters(model)
        if checkpointing and order == "inject_first":
            model.enable_gradient_checkpointing(True)
        model.train()
        torch.manual_seed(0)  # same dropout masks; checkpointing replays the RNG state
        _loss(model, ids).backward()
        lora.check_gradients(model)
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and len(plain) == 14 * 3
    for n in plain:
        # observed bit-equal (0.0): checkpointing recomputes the same kernels; the tolerance is slack only
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-7, msg=n)


def test_check_gradients_reports_missing_grad(ckpt_dirs):
    model = lora.inject(load_ours(ckpt_dirs[False]), r=2)
    model.model.layers[1].self_attn.q_proj.adapters_enabled = False  # this adapter goes unused
    _loss(model, random_ids(1, 5)).backward()
    with pytest.raises(RuntimeError, match=r"layers\.1\.self_attn\.q_proj\.lora_A\.weight.*no gradient"):
        lora.check_gradients(model)


def test_trainable_state_dict_round_trip(ckpt_dirs):
    a = lora.inject(load_ours(ckpt_dirs[False]), r=4, dora=True)
    randomise_adapters(a, seed=1)
    b = lora.inject(load_ours(ckpt_dirs[False]), r=4, dora=True)
    assert not torch.equal(a(random_ids(1, 4)), b(random_ids(1, 4)))
    state = lora.trainable_state_dict(a)
    lora.load_trainable_state_dict(b, state)
    ids = random_ids(2, 6)
    assert torch.equal(a(ids), b(ids))
    state.pop(next(iter(state)))
    with pytest.raises(KeyError, match="missing"):
        lora.load_trainable_state_dict(b, state)


def test_full_state_dict_round_trip(ckpt_dirs):
    a = lora.inject(load_ours(ckpt_dirs[True]), r=4, modules_to_save=["lm_head"])
    randomise_adapters(a, seed=2)
    b = lora.inject(load_ours(ckpt_dirs[True]), r=4, modules_to_save=["lm_head"])
    b.load_state_dict(a.state_dict())  # strict: keys of base + adapters + copies line up
    ids = random_ids(2, 6)
    assert torch.equal(a(ids), b(ids))


def test_bf16_model_trains_fp32_adapters(ckpt_dirs):
    ids = random_ids(2, 8)
    ref = load_ours(ckpt_dirs[False])
    torch.manual_seed(0)
    lora.inject(ref, r=4, alpha=8, dora=True)
    randomise_adapters(ref)
    model = load_ours(ckpt_dirs[False]).to(torch.bfloat16)
    torch.manual_seed(0)
    lora.inject(model, r=4, alpha=8, dora=True)
    randomise_adapters(model)
    assert all(p.dtype == torch.float32 for p in lora.trainable_state_dict(model).values())
    logits = model(ids)
    assert logits.dtype == torch.bfloat16
    # observed 9.4e-3 (0.19 of the bound): bf16 rounding of weights and activations (IEEE, the same
    # on every CPU); fp32 summation order is ~1e-6 of the logits, 1e-4 of the bound
    assert max_rel_err(logits.float(), ref(ids)) < 5e-2
    model(ids, labels=ids).backward()
    lora.check_gradients(model)
