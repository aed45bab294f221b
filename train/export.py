"""The final outputs of a run, written by rank 0 when training ends (never after an interruption).

    lora            out/adapter   PEFT adapter (+ tokenizer), base_model_name_or_path = the base model
    full            out/model     HF-format model (+ tokenizer)
    full-then-lora  out/model     the model after the full phase, HF format (+ tokenizer), and
                    out/adapter   the adapter trained on it, base_model_name_or_path = out/model:
                                  PEFT's adapter on out/model is the trained function
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from torch import nn

import lora


def save_final(model: nn.Module, out: Path, mode: str, tokenizer=None, base_model: Optional[str] = None) -> dict[str, str]:
    """Write the outputs of `mode` (table above) into `out`; returns {"adapter"|"model": path}.
    base_model: the adapter's base_model_name_or_path in lora mode (default: where the model was
    loaded from)."""
    from models.qwen import save

    paths = {}
    if mode in ("full", "full-then-lora"):
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
