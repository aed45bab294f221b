"""Swapping a submodule by its dotted name (every wrapper of the project does it: 4-bit layers on
load, adapter layers on inject, trainable copies, new vocabulary rows), and the protocol of a
wrapper that runs another module in its place.

    replace_module(model, "lm_head", wrapper)   # returns the module it replaces
    isinstance(head, RunsInPlace) and head.live_module()   # the module the wrapper runs now
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import nn


@runtime_checkable
class RunsInPlace(Protocol):
    """A wrapper that runs one of its modules in place of itself (a trainable copy of the head
    runs the copy, or the frozen original while adapters are off). The model looks through it
    to `live_module()` where it needs the layer itself: the chunked loss fuses the head's matmul
    with the softmax only for a plain linear head."""

    def live_module(self) -> nn.Module:
        """The module this wrapper's forward runs now."""
        ...


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` where `model.get_submodule(name)` is; returns the module it replaces. The new
    module takes the old one's training mode, so wrapping a model in eval mode keeps it there
    (dropout inside an adapter must not switch on by itself)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    new.train(old.training)
    setattr(parent, child, new)
    return old
