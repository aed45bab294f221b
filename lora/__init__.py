"""LoRA / rsLoRA / DoRA adapters for our Qwen (and any nn.Module with nn.Linear layers).

    layer.py (LoRALinear: y = base(x) + scale·B(A(x))), fused_update.py (its fast path),
    inject.py, merge.py, peft_io.py (PEFT files), config.py (settings), targets.py, state.py,
    toggle.py, summary.py, trainable_copy.py (modules_to_save), new_rows.py (new vocabulary
    rows), v1_adapter.py (Qwen-7B v1 names), delta/ (weight deltas)

    import lora
    lora.inject(model, r=16, alpha=16, dropout=0.05, targets="all-linear")  # freezes the base
    print(lora.summary(model))             # trainable vs total parameters
    print(lora.coverage(model))            # "LoRA on 4 attention + 3×64 expert matrices per layer (...)"
    lora.save(model, "out/adapter")        # PEFT format: adapter_config.json + adapter_model.safetensors
    lora.load(model, "out/adapter")        # also adapters written by PEFT; injects as needed
    with lora.disable_adapters(model): ... # the base model, for comparison
    lora.merge(model)                      # folds adapters in (fp32, one cast); plain nn.Linear again
"""

import _qwen_tune

_qwen_tune.claim(__name__)  # our sibling packages, not a user's same-named files (see _qwen_tune)

from .config import AdapterError, LoRAConfig, read_peft_config
from .inject import adapter_modules, config_of, has_adapters, inject, trainable_copies
from .layer import LoRALinear, is_linear, is_nf4_linear
from .merge import merge, merged_linear
from .peft_io import load, read_adapter_tensors, save
from .state import adapter_state_dict, base_state_dict, load_trainable_state_dict, trainable_state_dict
from .summary import AdapterSummary, check_gradients, coverage, summary
from .targets import ALL_LINEAR, V1_ALIASES, linear_names, resolve_targets
from .toggle import disable_adapters, set_adapters_enabled
from .trainable_copy import TrainableCopy

__all__ = [
    "LoRALinear", "TrainableCopy", "LoRAConfig", "AdapterError", "AdapterSummary",
    "inject", "merge", "save", "load", "summary", "coverage", "disable_adapters", "set_adapters_enabled",
    "trainable_state_dict", "load_trainable_state_dict", "adapter_state_dict", "base_state_dict", "check_gradients",
    "adapter_modules", "config_of", "trainable_copies", "has_adapters", "merged_linear", "read_peft_config",
    "read_adapter_tensors", "resolve_targets", "linear_names", "is_linear", "is_nf4_linear",
    "ALL_LINEAR", "V1_ALIASES",
]
