"""NF4Quantizer: what `models.qwen.load(dir, quantize=...)` calls to build 4-bit decoder linears.

    model = models.qwen.load(dir, dtype=torch.bfloat16, quantize=quant.NF4Quantizer())
    model = models.qwen.load(dir, quantize=quant.quantizer_for(dir, qlora=args.qlora))
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch

from fileio.safe_load import read_json

from .linear import NF4Linear
from .nf4 import quantize
from .serialization import STAT_SUFFIXES, nf4_from_state


class NF4Quantizer:
    """The models.qwen.checkpoint.Quantizer of NF4: `models.qwen.load(dir, quantize=NF4Quantizer())`
    calls it for each decoder nn.Linear, and reads "-bnb-4bit" checkpoints through it."""

    serialized_suffixes = STAT_SUFFIXES
    # Without double quantisation bitsandbytes writes no nested_* tensors: these are enough.
    required_suffixes = ("weight.absmax", "weight.quant_map", "weight.quant_state.bitsandbytes__nf4")

    def __init__(self, blocksize: int = 64, double_quant: bool = True) -> None:
        self.blocksize = blocksize
        self.double_quant = double_quant

    def quantize_linear(self, name: str, weight: torch.Tensor, bias: Optional[torch.Tensor], *, device, compute_dtype) -> NF4Linear:
        """weight [out, in] as read from disk -> NF4Linear on `device` (quantised in the model dtype,
        as transformers casts to torch_dtype before bitsandbytes quantises)."""
        if weight.dim() != 2:
            raise ValueError(f"{name}.weight: expected a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
        q = quantize(weight.to(device=device, dtype=compute_dtype), self.blocksize, self.double_quant)
        return NF4Linear(q, bias, compute_dtype=compute_dtype)

    def load_serialized(self, name: str, tensors: dict, bias: Optional[torch.Tensor], *, device, compute_dtype) -> NF4Linear:
        """A pre-quantised bitsandbytes 4-bit module ("-bnb-4bit" checkpoints)."""
        q = nf4_from_state(f"{name}.weight", tensors, device=device)
        if len(q.shape) != 2:
            raise ValueError(f"{name}.weight: corrupt 4-bit quant_state: shape {list(q.shape)} is not [out, in]")
        return NF4Linear(q, bias, compute_dtype=compute_dtype)


def saved_in_4bit(model_dir: Union[str, os.PathLike]) -> bool:
    """Whether config.json of `model_dir` says its weights are bitsandbytes 4-bit ("-bnb-4bit")."""
    try:
        raw = read_json(Path(model_dir) / "config.json")
    except (OSError, ValueError):
        return False  # no or unreadable config: load() names the problem
    return isinstance(raw, dict) and bool(raw.get("quantization_config"))


def quantizer_for(model_dir: Union[str, os.PathLike], qlora: bool) -> Optional[NF4Quantizer]:
    """The quantizer `load` needs for `model_dir`: NF4 when QLoRA is asked for or the checkpoint is
    saved in 4-bit already, else None (a 16-bit load)."""
    return NF4Quantizer() if qlora or saved_in_4bit(model_dir) else None
