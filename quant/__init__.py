"""NF4 4-bit quantisation, byte-compatible with bitsandbytes, in plain PyTorch.

    import quant
    q = quant.nf4.quantize(weight, blocksize=64, double_quant=True)   # q.packed: uint8, bnb layout
    w = q.dequantize()                                                # == bitsandbytes dequantize_4bit
    quant.quantize_model(model, skip=("lm_head",))                    # nn.Linear -> quant.NF4Linear
    models.qwen.load(dir, quantize="nf4")                             # streaming 4-bit load

Importing this package registers the "nf4" quantizer with `models.qwen.checkpoint`.
bitsandbytes is optional (used for CUDA dequantisation when it imports).
"""

from __future__ import annotations

from typing import Optional

import torch

from models.qwen.checkpoint import register_quantizer

from . import nf4
from .linear import NF4Linear
from .memory import MemoryReport, memory_report
from .model import quantize_model
from .nf4 import NF4Tensor, quantize
from .serialization import STAT_SUFFIXES, hf_quantization_config, nf4_from_state, nf4_to_state


class NF4Quantizer:
    """What `models.qwen.load(..., quantize="nf4")` calls for each decoder nn.Linear."""

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


register_quantizer("nf4", NF4Quantizer())

__all__ = [
    "nf4", "quantize", "NF4Tensor", "NF4Linear", "quantize_model", "NF4Quantizer",
    "memory_report", "MemoryReport", "hf_quantization_config", "nf4_to_state", "nf4_from_state",
]
