"""`merge`: fold every adapter into its base weight (float32 math, one cast) and restore plain
modules, so the model saves as an ordinary checkpoint."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from models.qwen.module_tree import replace_module

from .inject import adapter_modules, restore_flags, trainable_copies
from .layer import LoRALinear


@torch.no_grad()
def merged_linear(layer: LoRALinear) -> nn.Linear:
    """The plain nn.Linear equal to `layer` with its adapter folded in.

    nn.Linear base: the same module with W <- cast(W + scale·B·A) (DoRA: m ⊙ (..)/‖..‖_row).
    NF4 base: a new nn.Linear in the compute dtype holding dequantize(W) + delta — to merge into
    the original 16-bit weights instead, load the 16-bit base, `lora.load` the adapter there
    (the keys are the same) and merge that.
    """
    base = layer.base_layer
    w = layer.merged_weight()  # float32 [out, in]
    if isinstance(base, nn.Linear):
        base.weight = nn.Parameter(w.to(base.weight.dtype), requires_grad=False)
        return base
    dtype = base.compute_dtype
    bias = base.bias
    linear = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, device=w.device, dtype=dtype)
    linear.weight = nn.Parameter(w.to(dtype), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
    return linear


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold all LoRA/DoRA adapters in and unwrap modules_to_save copies; returns `model`.

    Afterwards the model holds plain nn.Linear / nn.Embedding modules with its original
    parameter names; tied embeddings stay tied (the tied copies share one Parameter);
    requires_grad flags are those from before `inject`.
    """
    layers = adapter_modules(model)
    copies = trainable_copies(model)
    if not layers and not copies:
        raise ValueError(f"{type(model).__name__} holds no LoRA adapter to merge")
    for name, layer in layers.items():
        replace_module(model, name, merged_linear(layer))
    for name, wrapper in copies.items():
        replace_module(model, name, wrapper.modules_to_save)
    restore_flags(model)
    sync_tied_config(model)
    return model


def sync_tied_config(model: nn.Module) -> None:
    """If the model's config says tied but the head no longer shares the embedding, say so."""
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "tie_word_embeddings", False):
        return
    try:
        head = model.get_submodule("lm_head")
        embed = model.get_submodule("model.embed_tokens")
    except AttributeError:
        return
    if getattr(head, "weight", None) is not getattr(embed, "weight", None):
        warnings.warn(
            "lm_head no longer shares embed_tokens' weight (the adapter trained them separately): "
            "the model is untied now and config.tie_word_embeddings is set to False"
        )
        config.tie_word_embeddings = False
