"""Adapters on and off: with them off the model computes exactly its base."""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

from .layer import LoRALinear
from .trainable_copy import TrainableCopy


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every adapter (and modules_to_save copy) on or off; off = the base model."""
    for m in model.modules():
        if isinstance(m, (LoRALinear, TrainableCopy)):
            m.adapters_enabled = bool(enabled)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """`with lora.disable_adapters(model): base_logits = model(ids)` — evaluate the base."""
    mods = [m for m in model.modules() if isinstance(m, (LoRALinear, TrainableCopy))]
    before = [m.adapters_enabled for m in mods]
    for m in mods:
        m.adapters_enabled = False
    try:
        yield model
    finally:
        for m, state in zip(mods, before):
            m.adapters_enabled = state
