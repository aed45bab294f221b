"""What an adapted model trains: parameter counts, and the check that every trainable parameter
received a finite gradient (the classic frozen-base + checkpointing failure)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from .inject import adapter_modules, trainable_copies
from .layer import is_linear, is_nf4_linear


@dataclass
class AdapterSummary:
    trainable: int
    total: int
    adapted_modules: int
    trainable_copies: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable%: {self.percent:.4f} || LoRA modules: {self.adapted_modules}"
            + (f" || modules_to_save: {self.trainable_copies}" if self.trainable_copies else "")
        )


def summary(model: nn.Module) -> AdapterSummary:
    """Trainable vs total parameters (tied weights once; NF4 weights at their logical size)."""
    seen: set[int] = set()
    trainable = total = 0
    for module in model.modules():
        if is_nf4_linear(module):
            n = module.in_features * module.out_features
            total += n
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor) and id(bias) not in seen:
                seen.add(id(bias))
                total += bias.numel()
                trainable += bias.numel() if bias.requires_grad else 0
            for p in module.parameters():
                seen.add(id(p))
            continue
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
    return AdapterSummary(trainable, total, len(adapter_modules(model)), len(trainable_copies(model)))


def check_gradients(model: nn.Module) -> None:
    """After backward: every trainable parameter has a finite gradient, else a clear error.

    Catches the classic frozen-base + checkpointing failure where adapters silently get none.
    """
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            raise RuntimeError(
                f"trainable parameter {name!r} received no gradient: is it used in the forward pass "
                "(adapters enabled, gradient checkpointing non-reentrant)?"
            )
        if not torch.isfinite(p.grad).all():
            raise RuntimeError(f"trainable parameter {name!r} has a non-finite gradient")


# ---------------------------------------------------------------------- what the adapters cover
_LAYER = re.compile(r"^(?:.*\.)?layers\.(?P<i>\d+)\.(?P<rest>.+)$")
_ROUTED = re.compile(r"^mlp\.experts\.(?P<e>\d+)\.(?P<proj>\w+)$")


def _category(rest: str) -> str:
    if _ROUTED.match(rest):
        return "expert"
    if rest.startswith("mlp.shared_expert_gate"):
        return "shared-expert-gate"
    if rest.startswith("mlp.shared_expert."):
        return "shared-expert"
    if rest.startswith("mlp."):
        return "MLP"
    if "attn" in rest.split(".", 1)[0]:
        return "attention"
    return "other"


def _ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5] -> "layers 0-2,5"; [3] -> "layer 3"."""
    out, start = [], None
    for a, b in zip(ids, ids[1:] + [None]):
        start = a if start is None else start
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}-{a}")
            start = None
    return ("layer " if len(ids) == 1 else "layers ") + ",".join(out)


def coverage(model: nn.Module) -> str:
    """One line: how many matrices of each kind carry an adapter, per decoder layer, e.g.
    "LoRA on 4 attention + 3×64 expert + 3 shared-expert matrices per layer (48 layers, 9552 in all)";
    routed-expert projections left without one are named ("..., 0 of 3×64 expert matrices per
    layer adapted"), so a target list that misses the experts cannot go unnoticed."""
    adapted = set(adapter_modules(model))
    per_layer: dict[int, dict[str, list[int]]] = {}   # layer -> category -> [adapted, total]
    experts: dict[int, dict[str, set[int]]] = {}      # layer -> projection -> experts (all)
    outside = [0, 0]
    for name, module in model.named_modules():
        if not (is_linear(module) or name in adapted) or name.rsplit(".", 1)[0] in adapted:
            continue
        m = _LAYER.match(name)
        if not m:
            if name.rsplit(".", 1)[-1] != "lm_head" or name in adapted:
                outside[0] += name in adapted
                outside[1] += 1
            continue
        i, rest = int(m["i"]), m["rest"]
        cat = _category(rest)
        counts = per_layer.setdefault(i, {}).setdefault(cat, [0, 0])
        counts[0] += name in adapted
        counts[1] += 1
        r = _ROUTED.match(rest)
        if r:
            experts.setdefault(i, {}).setdefault(r["proj"], set()).add(int(r["e"]))

    def expert_text(i: int, n: int) -> str:
        projs = experts.get(i, {})
        E = max((len(s) for s in projs.values()), default=0)
        return f"{n // E}×{E}" if n and E and n % E == 0 else str(n)

    order = ["attention", "MLP", "expert", "shared-expert", "shared-expert-gate", "other"]
    groups: dict[str, list[int]] = {}
    missing: dict[str, list[int]] = {}
    for i in sorted(per_layer):
        cats = per_layer[i]
        parts = [f"{expert_text(i, cats[c][0]) if c == 'expert' else cats[c][0]} {c}"
                 for c in order if c in cats and cats[c][0]]
        groups.setdefault(" + ".join(parts) or "no", []).append(i)
        if "expert" in cats and cats["expert"][0] < cats["expert"][1]:
            e = cats["expert"]
            missing.setdefault(f"{expert_text(i, e[0])} of {expert_text(i, e[1])} expert matrices", []).append(i)
    total = len(adapted)
    if len(groups) == 1:
        (desc, ids), = groups.items()
        text = f"LoRA on {desc} matrices per layer ({len(ids)} layers"
    else:
        text = "LoRA per layer on " + "; ".join(f"{d} matrices ({_ranges(ids)})" for d, ids in groups.items())
        text += " ("
    text += f", {total} in all" if len(groups) == 1 else f"{total} in all"
    if outside[0]:
        text += f", {outside[0]} outside the layers"
    text += ")"
    for desc, ids in missing.items():
        text += f"; only {desc} adapted in {_ranges(ids)}"
    return text
