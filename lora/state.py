"""The model's tensors as state dicts: the trainable ones (training checkpoints), the adapter in
PEFT's keys (adapter_model.safetensors), and the base without the adapters (its HF export)."""

from __future__ import annotations

import torch
from torch import nn

from .layer import LoRALinear
from .trainable_copy import TrainableCopy

PEFT_PREFIX = "base_model.model."


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter by its model name (a shared Parameter once), detached.

    This is what a training checkpoint needs besides the frozen base; see
    `load_trainable_state_dict` for the strict inverse.
    """
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into the trainable parameters: every key present, none extra, same shapes."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = [n for n in params if n not in state]
    extra = [k for k in state if k not in params]
    if missing or extra:
        raise KeyError(
            "trainable state dict does not match the model: "
            + (f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"unexpected {extra[:3]}{' ...' if len(extra) > 3 else ''}" if extra else "")
        )
    for n, p in params.items():
        if tuple(state[n].shape) != tuple(p.shape):
            raise ValueError(f"trainable state {n!r}: shape {tuple(state[n].shape)}, model has {tuple(p.shape)}")
        p.copy_(state[n])


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter in PEFT's keys: `base_model.model.<path>.lora_A.weight` [r, in],
    `.lora_B.weight` [out, r], `.lora_magnitude_vector` [out] (DoRA), and for
    modules_to_save `base_model.model.<path>.weight` (the trained copy)."""
    out: dict[str, torch.Tensor] = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach()
            out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach()
            if m.use_dora:
                out[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = m.lora_magnitude_vector.detach()
        elif isinstance(m, TrainableCopy):
            for key, value in m.modules_to_save.state_dict().items():
                out[f"{PEFT_PREFIX}{name}.{key}"] = value.detach()
    if not out:
        raise ValueError(f"{type(model).__name__} holds no LoRA adapter: call lora.inject(model) or lora.load first")
    return out


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's tensors under their checkpoint names, without the adapters (what
    `models.qwen.save(model, dir, state_dict=...)` writes for the base of a LoRA model): the
    trainable copies of modules_to_save are left out too (their originals keep their names)."""
    adapter = (".lora_A.", ".lora_B.", ".lora_magnitude_vector", ".modules_to_save.")
    return {k: v for k, v in model.state_dict().items() if not any(a in f"{k}." for a in adapter)}
