"""The final outputs of a run, written by rank 0 when training ends (never after an interruption).

    base trained (train.phases.trains_base: the full mode, and the two-phase mode's full phase)
                    out/model     the model after its full training, HF format (+ tokenizer)
    adapters held (the lora mode, and the two-phase mode after its switch)
                    out/adapter   PEFT adapter (+ tokenizer); base_model_name_or_path = out/model
                                  when that was written (PEFT's adapter on it is the trained
                                  function), else the base model
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from torch import nn

import lora

from .phases import trains_base


def save_final(model: nn.Module, out: Path, mode: str, tokenizer=None, base_model: Optional[str] = None) -> dict[str, str]:
    """Write the outputs of `mode` (a train.config.MODES value; table above) into `out`; returns {"adapter"|"model": path}.
    base_model: the adapter's base_model_name_or_path in lora mode (default: where the model was
    loaded from)."""
    from models.qwen import save

    paths = {}
    if trains_base(mode):
        target = out / "model"
        state = lora.base_state_dict(model) if lora.has_adapters(model) else None
        save(model, target, tokenizer=tokenizer, state_dict=state)
        paths["model"] = str(target)
        base_model = str(target.resolve())
    if lora.has_adapters(model):
        base = base_model or getattr(model, "name_or_path", None)
        target = out / "adapter"
        lora.save(model, target, base_model_name_or_path=str(Path(base).resolve()) if base else None,
                  tokenizer=tokenizer)
        paths["adapter"] = str(target)
    return paths
