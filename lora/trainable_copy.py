"""`TrainableCopy`: PEFT's `modules_to_save` — a fully trainable copy of a whole module.

Used for `embed_tokens` / `lm_head` so that new tokens can be trained. The original module
stays frozen (and keeps its state-dict keys: `lm_head.weight`), the copy is extra
(`lm_head.modules_to_save.weight`); with adapters disabled the original is used. For a tied
model, the copies of `embed_tokens` and `lm_head` share one Parameter, so they stay tied.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from .layer import FlattenedBase, is_nf4_linear


class TrainableCopy(FlattenedBase):
    """Wraps `original` (frozen) and runs a trainable deep copy of it in its place."""

    _flattened_child = "original_module"

    def __init__(self, original: nn.Module, shared_weight: Optional[nn.Parameter] = None):
        super().__init__()
        if is_nf4_linear(original):
            raise ValueError("modules_to_save cannot hold a 4-bit (NF4) module: its copy could not be trained")
        if isinstance(original, TrainableCopy):
            raise ValueError("this module is already a modules_to_save copy")
        for p in original.parameters():
            p.requires_grad_(False)
        self.original_module = original
        trained = copy.deepcopy(original)
        if shared_weight is not None:
            # Tied embeddings: both copies use one Parameter, exactly as the originals did.
            if tuple(shared_weight.shape) != tuple(trained.weight.shape):
                raise ValueError(
                    f"tied modules_to_save weights differ in shape: {tuple(shared_weight.shape)} "
                    f"vs {tuple(trained.weight.shape)}"
                )
            trained.weight = shared_weight
        for p in trained.parameters():
            p.requires_grad_(True)
        self.modules_to_save = trained
        self.adapters_enabled = True
        self._init_flattening()

    @property
    def active(self) -> nn.Module:
        return self.modules_to_save if self.adapters_enabled else self.original_module

    def live_module(self) -> nn.Module:
        """models.qwen.module_tree.RunsInPlace: the model looks through us to the module we run."""
        return self.active

    @property
    def weight(self) -> torch.Tensor:
        """The weight the forward uses (lets `model.is_tied`-style checks see through us)."""
        return self.active.weight

    def forward(self, *args, **kwargs):
        return self.active(*args, **kwargs)
