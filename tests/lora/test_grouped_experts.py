"""The grouped MoE LoRA path (lora/grouped_experts.py: all experts as grouped GEMMs) against the
per-expert loop it replaces (models.qwen.moe.SparseMoeBlock with no expert kernel: one LoRALinear
call per expert and projection, itself checked against PEFT in test_moe_lora.py), for the loss and
every adapter gradient: plain fp32 experts with some experts receiving no token, NF4 experts, and
the shared-expert block (Qwen3-Next).

Tolerances are measured (tests/helpers.py, FLOOR_FACTOR): the reference is the loop in fp32, its
floor the same loop in float64 on the same weights and inputs; the grouped result must lie
within FLOOR_FACTOR floors of the fp32 loop for the loss and each adapter gradient. An expert that gets no token has an exactly zero gradient,
as in the loop.
"""

from __future__ import annotations

import copy

import pytest
import torch

import lora
from lora.grouped_experts import expert_kernel
from models.qwen import load
from models.qwen.moe import SparseMoeBlock, group_offsets, grouped_mm
from quant import NF4Quantizer
from tests.helpers import assert_close_to_reference, hf_model, max_rel_err, random_ids, save_hf_model
from tests.lora.conftest import randomise_adapters


def _step(model, ids, grouped: bool):
    """(loss, {adapter parameter: grad}, kernel results) of one forward + backward, the experts run
    grouped or by the per-expert loop."""
    used = []

    def spy(block, rows, counts):
        out = expert_kernel(block, rows, counts)
        used.append(out is not None)
        return out

    for block in model.modules():
        if isinstance(block, SparseMoeBlock):
            block.expert_kernel = spy if grouped else None
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, used


def _check_against_loop(model, ids):
    """Grouped vs loop (fp32) vs loop (float64): loss and every adapter gradient within the floor."""
    twin = copy.deepcopy(model).to(torch.float64)
    loss64, grads64, _ = _step(twin, ids, grouped=False)
    loss32, grads32, _ = _step(model, ids, grouped=False)
    loss, grads, used = _step(model, ids, grouped=True)
    assert used and all(used)  # every MoE block ran grouped
    assert set(grads) == set(grads32) and any(".mlp.experts." in n for n in grads)
    assert_close_to_reference(loss, loss32, loss64, what="loss")
    worst = 0.0
    for name in grads32:
        if not grads32[name].any():  # an expert without tokens: exactly zero in both
            assert not grads[name].any(), name
            continue
        worst = max(worst, assert_close_to_reference(grads[name], grads32[name], grads64[name], what=name))
    return grads32, worst


@pytest.fixture
def qwen3_moe(tmp_path):
    save_hf_model(hf_model("qwen3_moe", num_experts_per_tok=1), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_grouped_experts_match_the_per_expert_loop_with_idle_experts(qwen3_moe):
    model = load(qwen3_moe, dtype=torch.float32)
    lora.inject(model, r=4, alpha=8)
    randomise_adapters(model, std=0.05)
    model.train()
    ids = random_ids(1, 4, seed=5)  # 4 tokens, top-1 of 6 experts: >= 2 experts idle per layer
    grads32, _ = _check_against_loop(model, ids)
    idle = [n for n, g in grads32.items() if not g.any()]
    assert len(idle) >= 2 * 6 * model.config.num_hidden_layers  # 2 experts x 3 projections x (A, B)
    from train.guards import check_gradients_present

    check_gradients_present(model, step=1)  # every adapter got a gradient tensor, idle ones zeros
    # the router is untouched: frozen, and no gradient reaches it
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.endswith("mlp.gate.weight"))


def test_grouped_nf4_experts_match_the_per_expert_loop(qwen3_moe):
    model = load(qwen3_moe, dtype=torch.float32, quantize=NF4Quantizer())
    lora.inject(model, r=4, alpha=8)
    randomise_adapters(model, std=0.05)
    ids = random_ids(2, 9, seed=3)
    # float64 twin: the same dequantised NF4 weights, in float64 (our loop runs it)
    twin = lora_twin_dequantised(model)
    loss64, grads64, _ = _step(twin, ids, grouped=False)
    loss32, grads32, _ = _step(model, ids, grouped=False)
    loss, grads, used = _step(model, ids, grouped=True)
    assert used and all(used)
    assert_close_to_reference(loss, loss32, loss64, what="loss")
    for name in grads32:
        assert_close_to_reference(grads[name], grads32[name], grads64[name], what=name)


def lora_twin_dequantised(model):
    """A float64 copy of an NF4 + LoRA model with each NF4 base replaced by its dequantised weight."""
    from quant import NF4Linear

    twin = copy.deepcopy(model)
    for name, m in list(twin.named_modules()):
        if isinstance(m, NF4Linear):
            dense = torch.nn.Linear(m.in_features, m.out_features, bias=False)
            dense.weight = torch.nn.Parameter(m.dequantize().detach().clone(), requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent), child, dense)
    return twin.to(torch.float64)


def test_grouped_shared_expert_block_matches_the_loop(tmp_path):
    """Qwen3-Next's block (routed experts + gated shared expert), a dense MLP layer beside it; two
    full-attention layers (the Gated DeltaNet has no float64 path for the floor)."""
    from tests.models.test_qwen3_next import hf_qwen3_next

    save_hf_model(hf_qwen3_next(num_hidden_layers=2, layer_types=["full_attention"] * 2, mlp_only_layers=[1]),
                  tmp_path / "ckpt")
    model = load(tmp_path / "ckpt", dtype=torch.float32)
    lora.inject(model, r=4, alpha=8)
    randomise_adapters(model, std=0.05)
    _check_against_loop(model, random_ids(1, 12, seed=2))


def test_grouped_mm_padded_fallback_and_bf16():
    """grouped_mm against F.linear per group, on a layout torch._grouped_mm refuses (rows of 20 bytes:
    the padded bmm runs) and in bf16 (bit-equal to F.linear's bf16 product per group)."""
    torch.manual_seed(0)
    counts = [3, 0, 5, 2]
    offsets = group_offsets(counts, "cpu")
    for dtype, (n_in, n_out) in ((torch.float32, (5, 3)), (torch.bfloat16, (16, 8))):
        x = torch.randn(sum(counts), n_in, dtype=dtype, requires_grad=True)
        w = torch.randn(len(counts), n_out, n_in, dtype=dtype, requires_grad=True)
        g = torch.randn(sum(counts), n_out, dtype=dtype)
        y = grouped_mm(x, w, offsets)
        y.backward(g)
        xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        ends = offsets.tolist()
        ref = torch.cat([torch.nn.functional.linear(xr[a:b], wr[e]) for e, (a, b) in enumerate(zip([0] + ends, ends))])
        ref.backward(g)
        bound = 0.0 if dtype == torch.bfloat16 else 4 * torch.finfo(dtype).eps
        assert max_rel_err(y, ref) <= bound and max_rel_err(x.grad, xr.grad) <= bound
        assert max_rel_err(w.grad, wr.grad) <= bound and not w.grad[1].any()


def test_all_linear_reports_every_expert_matrix(qwen3_moe):
    model = load(qwen3_moe, dtype=torch.float32)
    lora.inject(model, r=4)
    assert lora.coverage(model) == "LoRA on 4 attention + 3×6 expert matrices per layer (2 layers, 44 in all)"
    lora.merge(model)
    lora.inject(model, r=4, targets=["q_proj", "v_proj"])
    assert lora.coverage(model) == ("LoRA on 2 attention matrices per layer (2 layers, 4 in all); "
                                    "only 0 of 3×6 expert matrices adapted in layers 0-1")


