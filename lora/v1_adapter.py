"""PEFT adapters trained on Qwen-7B v1 (remote-code `QWenLMHeadModel`) onto our Qwen2 names.

Our loader maps v1 checkpoints onto the Qwen2 module names (models/qwen/families/v1.py), so a
v1 adapter is mapped the same way, with that family's renames: transformer.h.{i} ->
model.layers.{i}; attn.c_attn -> q/k/v_proj (lora_B and the DoRA magnitude split by rows,
lora_A shared: [q; k; v] = B·A·x row-block by row-block is exact); attn.c_proj ->
self_attn.o_proj; mlp.w1 -> up_proj; mlp.w2 -> gate_proj; mlp.c_proj -> down_proj;
transformer.wte -> model.embed_tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from models.qwen.families.v1 import FUSED_QKV, LAYER as _LAYER, MODULE_RENAMES, QKV_NAMES

from .config import AdapterError

PREFIX = "base_model.model."
# the adapted linears among the v1 family's renames (its layer norms are never LoRA targets)
_SIMPLE = {k: v for k, v in MODULE_RENAMES.items() if not k.startswith("ln_")}
_PARTS = (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector")
V1_MODULES_TO_SAVE = {"wte": "embed_tokens", "transformer.wte": "model.embed_tokens"}


def is_v1_adapter(tensors: dict[str, torch.Tensor], model: nn.Module) -> bool:
    """Keys in v1 names, on a model that has no `transformer` module."""
    if any(n == "transformer" for n, _ in model.named_children()):
        return False
    return any(k.startswith(PREFIX + "transformer.") for k in tensors)


def map_v1_adapter(tensors: dict[str, torch.Tensor], model: nn.Module, file) -> dict[str, torch.Tensor]:
    """v1-named adapter tensors -> our names (see module docstring). Unknown keys pass through
    unchanged, so `load` reports them by their original name."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        rest = key[len(PREFIX):] if key.startswith(PREFIX) else None
        if rest is None:
            out[key] = tensor
            continue
        if rest.startswith("transformer.wte."):
            out[PREFIX + "model.embed_tokens." + rest[len("transformer.wte."):]] = tensor
            continue
        m = _LAYER.match(rest)
        part = next((p for p in _PARTS if rest.endswith(p)), None)
        if not m or part is None:
            out[key] = tensor
            continue
        i, module = m.group(1), m.group(2)[: -len(part)]
        prefix = f"{PREFIX}model.layers.{i}."
        if module in _SIMPLE:
            out[prefix + _SIMPLE[module] + part] = tensor
        elif module == FUSED_QKV:
            names = list(QKV_NAMES)
            try:
                sizes = [model.get_submodule(f"model.layers.{i}.self_attn.{n}").out_features for n in names]
            except AttributeError:
                out[key] = tensor  # reported as matching no module
                continue
            if part == ".lora_A.weight":
                for n in names:
                    out[f"{prefix}self_attn.{n}{part}"] = tensor
                continue
            if tensor.shape[0] != sum(sizes):
                raise AdapterError(
                    f"{file}: key {key!r} has {tensor.shape[0]} rows, expected {sum(sizes)} (q+k+v of the model)"
                )
            for n, t in zip(names, torch.split(tensor, sizes, dim=0)):
                out[f"{prefix}self_attn.{n}{part}"] = t.contiguous()
        else:
            out[key] = tensor
    return out
