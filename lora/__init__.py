"""LoRA / rsLoRA / DoRA adapters for our Qwen (and any nn.Module with nn.Linear layers).

    import lora
    lora.inject(model, r=16, alpha=16, dropout=0.05, targets="all-linear")  # freezes the base
    print(lora.summary(model))             # trainable vs total parameters
    lora.save(model, "out/adapter")        # PEFT format: adapter_config.json + adapter_model.safetensors
    lora.load(model, "out/adapter")        # also adapters written by PEFT; injects as needed
    with lora.disable_adapters(model): ... # the base model, for comparison
    lora.merge(model)                      # folds adapters in (fp32, one cast); plain nn.Linear again
"""

from .config import AdapterError, LoRAConfig, read_peft_config
from .inject import (
    AdapterSummary,
    adapter_modules,
    adapter_state_dict,
    base_state_dict,
    check_gradients,
    config_of,
    disable_adapters,
    has_adapters,
    inject,
    load_trainable_state_dict,
    set_adapters_enabled,
    summary,
    trainable_copies,
    trainable_state_dict,
)
from .layer import LoRALinear, is_linear, is_nf4_linear
from .merge import merge, merged_linear
from .peft_io import load, read_adapter_tensors, save
from .targets import ALL_LINEAR, V1_ALIASES, linear_names, resolve_targets
from .trainable_copy import TrainableCopy

__all__ = [
    "LoRALinear", "TrainableCopy", "LoRAConfig", "AdapterError", "AdapterSummary",
    "inject", "merge", "save", "load", "summary", "disable_adapters", "set_adapters_enabled",
    "trainable_state_dict", "load_trainable_state_dict", "adapter_state_dict", "base_state_dict", "check_gradients",
    "adapter_modules", "config_of", "trainable_copies", "has_adapters", "merged_linear", "read_peft_config",
    "read_adapter_tensors", "resolve_targets", "linear_names", "is_linear", "is_nf4_linear",
    "ALL_LINEAR", "V1_ALIASES",
]
