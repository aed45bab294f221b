"""`LoRAConfig`: the settings of an injected adapter, and PEFT's adapter_config.json."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from fileio.errors import QwenTuneError
from fileio.safe_load import read_json

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"

Targets = Union[str, list[str], tuple[str, ...]]


class AdapterError(QwenTuneError, ValueError):
    """An adapter directory, file or key that cannot be used as it is (names what is wrong)."""


@dataclass
class LoRAConfig:
    """What `inject` did: enough to save a PEFT adapter_config.json and to re-inject.

    target_modules: what PEFT should match — a list of module-name suffixes or a regex string.
    modules: the exact module paths that hold an adapter (ours; not written to disk).
    """

    r: int = 16
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    target_modules: Union[str, list[str]] = field(default_factory=list)
    modules_to_save: Optional[list[str]] = None
    modules: list[str] = field(default_factory=list)

    def inject_kwargs(self) -> dict[str, Any]:
        """These settings as `lora.inject` keywords: lora.inject(model, **cfg.inject_kwargs())."""
        return dict(r=self.r, alpha=self.lora_alpha, dropout=self.lora_dropout, targets=self.target_modules,
                    rslora=self.use_rslora, dora=self.use_dora, modules_to_save=self.modules_to_save)

    @property
    def scale(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_peft(self, base_model_name_or_path: Optional[str] = None) -> dict[str, Any]:
        """The adapter_config.json dict PEFT's LoraConfig reads (peft_type LORA, CAUSAL_LM)."""
        alpha = self.lora_alpha
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path,
            "r": self.r,
            "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": self.target_modules,
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "bias": "none",
            "modules_to_save": list(self.modules_to_save) if self.modules_to_save else None,
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "layers_to_transform": None,
            "layers_pattern": None,
            "rank_pattern": {},
            "alpha_pattern": {},
            "revision": None,
        }


def read_peft_config(path: Union[str, os.PathLike], fused_experts: bool = False) -> dict[str, Any]:
    """Read and check an adapter_config.json; returns the fields `load` uses.

    Errors name the file and the field: only what we can reproduce exactly is accepted
    (LORA, bias "none", no per-module rank/alpha patterns, no fan_in_fan_out).
    fused_experts: a model whose routed experts PEFT adapts fused (lora/fused_experts.py):
    target_parameters, rank_pattern and alpha_pattern are returned for fused_experts.split to check.
    """
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"{path}: not found (a PEFT adapter directory holds {CONFIG_NAME})")
    raw = read_json(path, AdapterError, dict)

    def need(key: str, types, default=None, required=False):
        if key not in raw or raw[key] is None:
            if required:
                raise AdapterError(f"{path}: missing field {key!r}")
            return default
        value = raw[key]
        if not isinstance(value, types) or isinstance(value, bool) and bool not in _as_tuple(types):
            raise AdapterError(f"{path}: field {key!r} = {value!r} has the wrong type")
        return value

    peft_type = need("peft_type", str, required=True)
    if peft_type.upper() != "LORA":
        raise AdapterError(f"{path}: peft_type {peft_type!r} is not supported (expected 'LORA')")
    bias = need("bias", str, "none")
    if bias != "none":
        raise AdapterError(f"{path}: bias {bias!r} is not supported (expected 'none')")
    if need("fan_in_fan_out", bool, False):
        raise AdapterError(f"{path}: fan_in_fan_out=true is not supported (Qwen uses nn.Linear)")
    patterns = {key: need(key, dict, {}) for key in ("rank_pattern", "alpha_pattern")}
    for key, value in patterns.items():
        if value and not (fused_experts and raw.get("target_parameters")):
            raise AdapterError(f"{path}: {key} (per-module rank/alpha) is not supported; expected {{}}")
    if need("lora_bias", bool, False):
        raise AdapterError(f"{path}: lora_bias=true is not supported")
    for key in ("layers_to_transform", "trainable_token_indices", "layer_replication"):
        if raw.get(key):
            raise AdapterError(f"{path}: {key} is not supported (expected null)")
    target_parameters = need("target_parameters", (list, tuple), [])
    if target_parameters and not fused_experts:
        raise AdapterError(
            f"{path}: target_parameters {raw['target_parameters']!r} (LoRA on fused 3-D expert tensors, as PEFT "
            "trains on transformers 5 MoE models) is not supported: this library adapts each expert's "
            "gate_proj/up_proj/down_proj (the published checkpoints' layout, which PEFT converts on load)"
        )
    r = need("r", int, required=True)
    if r <= 0:
        raise AdapterError(f"{path}: r must be positive, got {r}")
    modules_to_save = need("modules_to_save", (list, tuple), None)
    return {
        "r": r,
        "lora_alpha": float(need("lora_alpha", (int, float), r)),
        "lora_dropout": float(need("lora_dropout", (int, float), 0.0)),
        "use_rslora": bool(need("use_rslora", bool, False)),
        "use_dora": bool(need("use_dora", bool, False)),
        "target_modules": need("target_modules", (str, list, tuple), None),
        "modules_to_save": list(modules_to_save) if modules_to_save else None,
        "base_model_name_or_path": raw.get("base_model_name_or_path"),
        "target_parameters": list(target_parameters),
        **patterns,
    }


def _as_tuple(types) -> tuple:
    return types if isinstance(types, tuple) else (types,)
