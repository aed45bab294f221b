"""What an adapted model trains: parameter counts, and the check that every trainable parameter
received a finite gradient (the classic frozen-base + checkpointing failure)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .inject import adapter_modules, trainable_copies
from .layer import is_nf4_linear


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
