"""`quantize_model`: replace the linears of a model by `NF4Linear`, in place."""

from __future__ import annotations

from typing import Iterable

from torch import nn

from models.qwen.module_tree import replace_module
from models.qwen.families import keeps_16bit

from .linear import NF4Linear


def _skipped(name: str, skip: Iterable[str]) -> bool:
    """True when `name` is one of `skip` or ends with ".<entry>" (e.g. "lm_head", "mlp.down_proj")."""
    return any(name == s or name.endswith("." + s) for s in skip)


def quantize_model(
    model: nn.Module,
    skip: Iterable[str] = ("lm_head",),
    blocksize: int = 64,
    double_quant: bool = True,
) -> nn.Module:
    """Replace every nn.Linear of `model` (except names matched by `skip`, and what the model's
    family keeps 16-bit as the streaming 4-bit load does: Family.frozen_linears, e.g. Qwen3.5-MoE's
    one-row shared_expert_gate) by a frozen NF4Linear.

    Policy, not targeting: all base linears become 4-bit whatever LoRA later wraps. Each
    layer's compute dtype is its current weight dtype (the model dtype). Returns `model`.
    """
    skip = tuple(skip)
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and not keeps_16bit(model, n) and not _skipped(n, skip)]
    if not targets:
        raise ValueError(f"quantize_model: no nn.Linear to quantise (skip={skip!r})")
    for name, linear in targets:
        replace_module(model, name, NF4Linear.from_linear(linear, blocksize=blocksize, double_quant=double_quant))
    return model
