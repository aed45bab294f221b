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

from models.qwen.moe import SparseMoeBlock, group_offsets, grouped_mm

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


def _project(x: torch.Tensor, layers: list, kind: str, offsets: torch.Tensor,
             x_cast: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Each expert's projection of its rows of x [M, in] -> [M, out] (x's dtype). x_cast: x already
    in the adapters' dtype (gate and up share one cast)."""
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
    xd = x_cast if x_cast is not None and x_cast.dtype == A.dtype else x.to(A.dtype)
    if isinstance(first.lora_dropout, nn.Dropout):
        xd = first.lora_dropout(xd)
    update = grouped_mm(grouped_mm(xd, A, offsets), B, offsets)
    return (out.to(A.dtype) + update * first.scale).to(out.dtype)


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
    x_cast = rows.float() if "adapted" in (kinds["gate_proj"], kinds["up_proj"]) else None
    gate = _project(rows, layers["gate_proj"], kinds["gate_proj"], offsets, x_cast)
    up = _project(rows, layers["up_proj"], kinds["up_proj"], offsets, x_cast)
    return _project(F.silu(gate) * up, layers["down_proj"], kinds["down_proj"], offsets)
