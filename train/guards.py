"""The loop's tripwires: non-finite losses/gradients, and the silent "nothing trains" failure.

    raise NonFiniteError(step=12, micro_batch=3, micro_batches=16, what="loss", parameter=first_nonfinite(model))
    check_gradients_present(model, step)          # before the first optimizer step: every trainable
    snapshot = lora_b_snapshot(model)             # parameter received a finite gradient
    check_lora_b_moved(model, snapshot, step)     # after it: every LoRA B moved

Gradient checkpointing with a frozen base can leave adapters without gradients (reentrant
checkpoints whose inputs do not require grad); that shows up only as a flat loss hours later.
The first-step check turns it into an error naming the parameter.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class NonFiniteError(FloatingPointError):
    """A NaN/Inf loss or gradient; names the step, the micro-batch and the first bad parameter."""

    def __init__(self, step: int, micro_batch: int, micro_batches: int, what: str,
                 parameter: Optional[str] = None, skipped_in_a_row: int = 0):
        self.step, self.micro_batch, self.what, self.parameter = step, micro_batch, what, parameter
        where = f"step {step}, micro-batch {micro_batch + 1} of {micro_batches}" if micro_batch >= 0 else f"step {step}"
        param = f"; first non-finite parameter: {parameter}" if parameter else "; every parameter is finite (bad input?)"
        tail = f"; {skipped_in_a_row} bad steps in a row (max_bad_steps)" if skipped_in_a_row else ""
        super().__init__(f"non-finite {what} at {where}{param}{tail}")


class NothingTrainsError(RuntimeError):
    """After the first optimizer step a trainable parameter had no/non-finite grad or LoRA B did not move."""


def first_nonfinite(model: nn.Module) -> Optional[str]:
    """Name of the first parameter whose value, then whose gradient, holds NaN/Inf ("x.grad")."""
    named = list(model.named_parameters())
    for name, p in named:
        if p.is_floating_point() and not torch.isfinite(p.detach()).all():
            return name
    for name, p in named:
        if p.grad is not None and not torch.isfinite(p.grad).all():
            return f"{name}.grad"
    return None


def check_gradients_present(model: nn.Module, step: int) -> None:
    """Before the first update: every trainable parameter received a finite gradient."""
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    if missing:
        raise NothingTrainsError(
            f"step {step}: {len(missing)} trainable parameter(s) received no gradient, first {missing[0]!r}. "
            "Is the module used in forward, are adapters enabled, and is gradient checkpointing non-reentrant?"
        )
    bad = [n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p.grad).all()]
    if bad:
        raise NothingTrainsError(f"step {step}: trainable parameter {bad[0]!r} has a non-finite gradient")


def lora_b_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every trainable LoRA B weight, by parameter name (empty without adapters)."""
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if p.requires_grad and ".lora_B." in f".{n}."}


def check_lora_b_moved(model: nn.Module, before: dict[str, torch.Tensor], step: int) -> None:
    """After the first update with lr > 0: each LoRA B differs from its snapshot."""
    params = dict(model.named_parameters())
    still = [n for n, b in before.items() if torch.equal(params[n].detach(), b)]
    if still:
        raise NothingTrainsError(
            f"step {step}: {len(still)} of {len(before)} LoRA B matrices did not change in the first optimizer "
            f"step, first {still[0]!r}: the adapter is not training (zero gradient, lr 0 or frozen)"
        )
