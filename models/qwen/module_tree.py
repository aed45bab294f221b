"""Swapping a submodule by its dotted name (every wrapper of the project does it: NF4 layers on
load, LoRA layers on inject, trainable copies, new vocabulary rows)."""

from __future__ import annotations

from torch import nn


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
