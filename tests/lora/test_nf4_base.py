"""LoRALinear over a 4-bit NF4 base: math equals dequantised W + scale·B·A (the dequantised
weight from bitsandbytes itself), gradients reach only the adapter, merge folds into the
dequantised weight, and the base's state-dict keys are unchanged.

The base is `quant.NF4Linear`; the reference weight is bitsandbytes' own quantise ->
dequantise of the same fp32 weight."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lora
from tests.helpers import DEVICES, assert_matches_formula

bnbf = pytest.importorskip("bitsandbytes.functional")


def _quant_nf4(linear: nn.Linear):
    import quant

    return quant.NF4Linear.from_linear(linear, blocksize=64, double_quant=True, compute_dtype=torch.float32)


BASES = {"quant.NF4Linear": _quant_nf4}


def _reference_weight(linear: nn.Linear) -> torch.Tensor:
    """Independent dequantised weight: bitsandbytes quantize -> dequantize of the same weight."""
    packed, state = bnbf.quantize_4bit(linear.weight.detach(), quant_type="nf4", compress_statistics=True, blocksize=64)
    return bnbf.dequantize_4bit(packed, state).float()


@pytest.mark.parametrize("kind", list(BASES))
@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_nf4_lora_math_and_grads(device, kind, dora):
    torch.manual_seed(0)
    linear = nn.Linear(128, 72, bias=True).to(device)
    base = BASES[kind](linear)
    assert lora.is_nf4_linear(base) and lora.is_linear(base)
    layer = lora.LoRALinear(base, r=4, alpha=8, rslora=True, dora=dora)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
        if dora:
            layer.lora_magnitude_vector.mul_(1.1)
    W = _reference_weight(linear)
    A, B, m = layer.lora_A.weight.detach(), layer.lora_B.weight.detach(), layer.lora_magnitude_vector

    def adapted_weight(W, A, B, m):
        V = W + (8 / math.sqrt(4)) * B @ A
        return m[:, None] * V / V.norm(dim=1, keepdim=True) if dora else V

    x = torch.randn(3, 5, 128).to(device).requires_grad_()
    y = layer(x)
    assert_matches_formula(y, lambda x, b, *w: x @ adapted_weight(*w).T + b, x, linear.bias, W, A, B, m)
    y.square().sum().backward()
    assert layer.lora_A.weight.grad is not None and layer.lora_B.weight.grad is not None
    assert x.grad is not None
    assert all(p.grad is None for p in base.parameters())
    # merge: a plain nn.Linear holding the dequantised weight + update
    merged = lora.merged_linear(layer)
    assert type(merged) is nn.Linear and merged.weight.dtype == base.compute_dtype
    assert_matches_formula(merged.weight, adapted_weight, W, A, B, m)


@pytest.mark.parametrize("kind", list(BASES))
def test_nf4_base_state_dict_keys_unchanged(kind):
    torch.manual_seed(0)
    base = BASES[kind](nn.Linear(64, 32))
    keys = set(base.state_dict())
    layer = lora.LoRALinear(base, r=2)
    assert set(layer.state_dict()) == keys | {"lora_A.weight", "lora_B.weight"}


def test_inject_into_model_with_nf4_linears():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("up", _quant_nf4(nn.Linear(64, 96)))
    model.add_module("act", nn.GELU())
    model.add_module("down", _quant_nf4(nn.Linear(96, 64)))
    lora.inject(model, r=4)
    assert set(lora.adapter_modules(model)) == {"up", "down"}
    s = lora.summary(model)
    assert s.trainable == 4 * (64 + 96) * 2
    assert s.total == s.trainable + 64 * 96 * 2 + 96 + 64  # NF4 weights at their logical size
