"""All routed experts of an MoE block with their adapters, as grouped GEMMs (no loop over experts).

The block (models.qwen.moe.SparseMoeBlock) sorts its (token, slot) rows by expert once per layer;
`expert_kernel` then runs every expert's SwiGLU on them at once:

    W = stack(expert base weights)  [E, out, in]   (NF4: each dequantised into the stacked buffer)
    y = grouped_mm(x, W)                          the frozen base, bf16 (its rounding as F.linear)
    y = round(y + scale · grouped_mm(grouped_mm(x, A), B))   A [E, r, in], B [E, out, r], fp32

for gate_proj and up_proj on the grouped rows, then down_proj on silu(gate) * up. The adapter is
applied as (x·Aᵀ)·Bᵀ per expert ("split LoRA"): B·A is never built. The arithmetic is PEFT's per
expert (fp32 update added to the upcast base output, one rounding), so the result is the per-expert
LoRALinear loop's to float rounding; gradients reach each expert's own lora_A / lora_B through the
stack (an expert without rows gets an exact zero). It declines (returns None: the loop runs) when
the experts are not uniform: DoRA, adapters on some experts only, different ranks, adapters
switched off on some, or under autocast.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from models.qwen.cpu_fast_paths import cast_shared, scratch
from models.qwen.moe import SparseMoeBlock, group_offsets, grouped_mm, grouped_product

from .fused_update import LORA_GRAD_Y, LORA_X, LORA_Y
from .layer import LoRALinear, is_linear

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def install(model: nn.Module) -> None:
    """Let every MoE block of `model` run its experts grouped (see module docstring)."""
    for block in model.modules():
        if isinstance(block, SparseMoeBlock):
            block.expert_kernel = expert_kernel


def _uniform(layers: list) -> Optional[str]:
    """"adapted" (all LoRALinear with one setting), "base" (no adapter on any), or None."""
    first = layers[0]
    if isinstance(first, LoRALinear):
        if first.use_dora or not first.adapters_enabled:
            return "base" if all(isinstance(m, LoRALinear) and not m.adapters_enabled and not m.use_dora
                                 for m in layers) else None
        p = getattr(first.lora_dropout, "p", 0.0)
        same = all(isinstance(m, LoRALinear) and m.adapters_enabled and not m.use_dora and m.r == first.r
                   and m.scale == first.scale and getattr(m.lora_dropout, "p", 0.0) == p
                   and m.lora_A.weight.dtype == first.lora_A.weight.dtype for m in layers)
        return "adapted" if same else None
    return "base" if all(is_linear(m) and not isinstance(m, LoRALinear) and m.bias is None for m in layers) else None


def _stacked_base(layers: list, dtype: torch.dtype) -> torch.Tensor:
    """The experts' frozen weights as one [E, out, in] tensor in `dtype`."""
    bases = [m.base_layer if isinstance(m, LoRALinear) else m for m in layers]
    first = bases[0]
    if isinstance(first, nn.Linear):
        return torch.stack([b.weight for b in bases]).to(dtype)
    out = torch.empty((len(bases), first.out_features, first.in_features), dtype=first.compute_dtype,
                      device=first.weight.device)
    for e, b in enumerate(bases):  # NF4: dequantised straight into the stacked buffer
        b._dequantize_into(out[e])
    return out.to(dtype)


def _project(x: torch.Tensor, layers: list, kind: str, offsets: torch.Tensor) -> torch.Tensor:
    """Each expert's projection of its rows of x [M, in] -> [M, out] (x's dtype)."""
    first = layers[0]
    bases = [m.base_layer if isinstance(m, LoRALinear) else m for m in layers]
    if any(b.bias is not None for b in bases):
        raise AssertionError("expert projections have no bias")
    base_dtype = bases[0].weight.dtype if isinstance(bases[0], nn.Linear) else bases[0].compute_dtype
    W = _stacked_base(layers, base_dtype)
    out = grouped_mm(x.to(base_dtype), W, offsets)
    if kind == "base":
        return out.to(x.dtype)
    A = torch.stack([m.lora_A.weight for m in layers])  # [E, r, in]
    B = torch.stack([m.lora_B.weight for m in layers])  # [E, out, r]
    xd = x
    if isinstance(first.lora_dropout, nn.Dropout) and first.lora_dropout.p > 0:
        xd = first.lora_dropout(x.to(A.dtype))  # after the cast, as PEFT (and lora_update)
    return _GroupedLoRAUpdate.apply(out, xd, A, B, offsets, first.scale)


class _GroupedLoRAUpdate(torch.autograd.Function):
    """y = round(base_out + scale · (x·A_eᵀ)·B_eᵀ) per expert's rows, the adapter math in A's dtype:
    lora/fused_update.py's _LoRAUpdate for all experts at once. Saves x in its own dtype (bf16) and
    x·Aᵀ [M, r]; the fp32 cast of x is CPU scratch shared by gate and up, in forward and backward.
    base_out [M, out], x [M, in], A [E, r, in], B [E, out, r]."""

    @staticmethod
    def forward(ctx, base_out, x, A, B, offsets, scale: float):
        x32 = cast_shared(x, A.dtype, LORA_X)
        xa = grouped_product(x32, A.transpose(-2, -1), offsets)  # [M, r]
        ctx.save_for_backward(x, xa, A, B, offsets)
        ctx.scale = scale
        update = grouped_product(xa, B.transpose(-2, -1), offsets)  # [M, out]
        if base_out.dtype == A.dtype:
            return update.mul_(scale).add_(base_out)
        y = scratch(tuple(base_out.shape), A.dtype, base_out.device, LORA_Y).copy_(base_out)
        return y.add_(update, alpha=scale).to(base_out.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        x, xa, A, B, offsets = ctx.saved_tensors
        need_base, need_x, need_A, need_B = ctx.needs_input_grad[:4]
        g = grad_y.contiguous()
        if g.dtype != A.dtype:
            g = scratch(tuple(g.shape), A.dtype, g.device, LORA_GRAD_Y).copy_(g)
        grad_x = grad_A = grad_B = None
        if need_B:
            grad_B = grouped_product(g.t(), xa, offsets).mul_(ctx.scale)  # [E, out, r]
        if need_x or need_A:
            g_xa = grouped_product(g, B, offsets).mul_(ctx.scale)  # [M, r]
            if need_A:
                grad_A = grouped_product(g_xa.t(), cast_shared(x, A.dtype, LORA_X), offsets)  # [E, r, in]
            if need_x:
                grad_x = grouped_product(g_xa, A, offsets).to(x.dtype)
        return (grad_y if need_base else None), grad_x, grad_A, grad_B, None, None


def expert_kernel(block: SparseMoeBlock, rows: torch.Tensor, counts: list) -> Optional[torch.Tensor]:
    """rows [M, hidden] grouped by expert (counts[e] rows each) -> every expert's SwiGLU of its rows,
    [M, hidden]; None when the experts cannot run grouped (the block then loops over them)."""
    if torch.is_autocast_enabled(rows.device.type):
        return None
    experts = block.experts
    layers = {p: [getattr(e, p) for e in experts] for p in PROJECTIONS}
    kinds = {p: _uniform(ls) for p, ls in layers.items()}
    if any(k is None for k in kinds.values()):
        return None
    offsets = group_offsets(counts, rows.device)
    gate = _project(rows, layers["gate_proj"], kinds["gate_proj"], offsets)
    up = _project(rows, layers["up_proj"], kinds["up_proj"], offsets)
    return _project(F.silu(gate) * up, layers["down_proj"], kinds["down_proj"], offsets)
