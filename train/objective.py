"""What one optimizer step minimises.

    objective = LanguageModelLoss()           # the default: next-token cross-entropy
    n = objective.count(batch)                # normalisation units in a micro-batch
    loss_sum, metrics = objective(model, batch)

The Trainer draws the grad_accum micro-batches of a step, sums `count(batch)` over them (and
over the processes) into N, runs `loss_sum, metrics = objective(model, batch)` on each and
backpropagates loss_sum / N, so the step's gradient is that of the mean over every unit of the
whole step, however it is split into micro-batches. Logged metrics are the sums over the step
divided by N. A preference objective (train.preference) counts pairs instead of tokens.
"""

from __future__ import annotations

from typing import Protocol

import torch

from models.qwen import IGNORE_INDEX

MODEL_INPUTS = ("position_ids", "document_ids", "attention_mask")


class Objective(Protocol):
    """See the module docstring."""

    unit: str          # what count() counts, for messages ("supervised token", "pair")
    count_name: str    # its key in metrics.jsonl ("supervised_tokens", "pairs")
    example_name: str  # what one dataset item (a row of --batch-size) is, plural ("sequences", "pairs")

    def count(self, batch: dict[str, torch.Tensor]) -> int: ...

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


def supervised_tokens(labels: torch.Tensor) -> int:
    """Targets of next-token prediction in a [B, T] label batch: labels[:, 1:] != -100."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


class LanguageModelLoss:
    """Summed next-token cross-entropy; the unit is a supervised token (labels != -100, shifted
    inside the model). The model must take `model(ids, labels=..., reduction="sum", **inputs)`
    and return (loss_sum, n_supervised_tokens)."""

    unit = "supervised token"
    count_name = "supervised_tokens"
    example_name = "sequences"

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return supervised_tokens(batch["labels"])

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        extras = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        loss_sum, n = model(batch["input_ids"], labels=batch["labels"], reduction="sum", **extras)
        expected = self.count(batch)
        if int(n) != expected:
            raise RuntimeError(f"the model counted {int(n)} supervised tokens, the batch holds {expected}: the model "
                               "must shift labels inside and ignore -100")
        return loss_sum, {}
