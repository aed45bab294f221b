"""The loop's tripwires: non-finite losses/gradients, and the silent "nothing trains" failure.

    raise NonFiniteError(step=12, micro_batch=3, micro_batches=16, what="loss", parameter=first_nonfinite(model))
    check_gradients_present(model, step)          # before the first optimizer step: every trainable
    snapshot = lora_b_snapshot(model)             # parameter received a finite gradient
    check_lora_b_moved(model, snapshot, step)     # after it: every LoRA B with a nonzero gradient
                                                  # moved (an unrouted expert's may not)

Gradient checkpointing with a frozen base can leave adapters without gradients (reentrant
checkpoints whose inputs do not require grad); that shows up only as a flat loss hours later.
The first-step check turns it into an error naming the parameter.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fileio.errors import QwenTuneError
from models.qwen.moe import SparseMoeBlock


class NonFiniteError(QwenTuneError, FloatingPointError):
    """A NaN/Inf loss or gradient; names the step, the micro-batch and the first bad parameter."""

    bad_input = False

    def __init__(self, step: int, micro_batch: int, micro_batches: int, what: str,
                 parameter: Optional[str] = None, skipped_in_a_row: int = 0):
        self.step, self.micro_batch, self.what, self.parameter = step, micro_batch, what, parameter
        where = f"step {step}, micro-batch {micro_batch + 1} of {micro_batches}" if micro_batch >= 0 else f"step {step}"
        param = f"; first non-finite parameter: {parameter}" if parameter else "; every parameter is finite (bad input?)"
        tail = f"; {skipped_in_a_row} bad steps in a row (max_bad_steps)" if skipped_in_a_row else ""
        super().__init__(f"non-finite {what} at {where}{param}{tail}")


class NothingTrainsError(QwenTuneError, RuntimeError):
    """After the first optimizer step a trainable parameter had no/non-finite grad or LoRA B did not move."""

    bad_input = False


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


def lora_b_snapshot(model: nn.Module) -> dict[str, tuple[torch.Tensor, bool]]:
    """Every trainable LoRA B weight by parameter name: (a copy, whether its gradient is nonzero).

    Taken after clipping, just before the first update (empty without adapters).
    """
    return {n: (p.detach().clone(), bool(_local(p.grad).any()))
            for n, p in model.named_parameters() if p.requires_grad and ".lora_B." in f".{n}."}


def check_lora_b_moved(model: nn.Module, before: dict[str, tuple[torch.Tensor, bool]], step: int) -> None:
    """After the first update with lr > 0: each LoRA B that had a nonzero gradient moved.

    A B whose gradient was exactly zero is legitimate only inside a routed MoE expert that no
    token reached in this step (its B starts at zero, so Adam, as torch.optim.AdamW, leaves it
    there). A zero gradient anywhere else, or on every B, means the adapter is cut off from the
    loss (alpha 0, an output dropped, a dead branch) and is an error too.
    """
    if not before:
        return
    params = dict(model.named_parameters())
    routed = _routed_expert_parameters(model)
    silent = [n for n, (_, nonzero) in before.items() if not nonzero and n not in routed]
    if silent or not any(nonzero for _, nonzero in before.values()):
        first = (silent or list(before))[0]
        count = len(silent) or len(before)
        raise NothingTrainsError(
            f"step {step}: {count} of {len(before)} LoRA B matrices received an all-zero gradient, first {first!r}: "
            "the adapter's output does not reach the loss (alpha 0, an output dropped?)"
        )
    still = [n for n, (b, nonzero) in before.items() if nonzero and torch.equal(params[n].detach(), b)]
    if still:
        raise NothingTrainsError(
            f"step {step}: {len(still)} of {len(before)} LoRA B matrices did not change in the first optimizer "
            f"step though their gradient was nonzero, first {still[0]!r}: the adapter is not training "
            "(lr 0, frozen, or dropped by the optimizer)"
        )


def _routed_expert_parameters(model: nn.Module) -> set[str]:
    """Names of the parameters inside a routed MoE expert (`SparseMoeBlock.experts`), whose
    gradient is exactly zero whenever the router sends that expert no token."""
    return {f"{name}.experts.{rest}" if name else f"experts.{rest}"
            for name, block in model.named_modules() if isinstance(block, SparseMoeBlock)
            for rest, _ in block.experts.named_parameters()}


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2), else `t` itself."""
    return t.to_local() if hasattr(t, "to_local") else t
