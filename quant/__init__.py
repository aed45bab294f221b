"""NF4 4-bit quantisation, byte-compatible with bitsandbytes, in plain PyTorch.

    import quant
    q = quant.nf4.quantize(weight, blocksize=64, double_quant=True)   # q.packed: uint8, bnb layout
    w = q.dequantize()                                                # == bitsandbytes dequantize_4bit
    quant.quantize_model(model, skip=("lm_head",))                    # nn.Linear -> quant.NF4Linear
    models.qwen.load(dir, quantize=quant.NF4Quantizer())              # streaming 4-bit load (QLoRA)

bitsandbytes is optional (used for CUDA dequantisation when it imports).
"""

from __future__ import annotations

import _qwen_tune

_qwen_tune.claim(__name__)  # our sibling packages, not a user's same-named files (see _qwen_tune)

from . import nf4
from .linear import NF4Linear
from .memory import MemoryReport, memory_report
from .model import quantize_model
from .nf4 import NF4Tensor, quantize
from .quantizer import NF4Quantizer, quantizer_for, saved_in_4bit
from .serialization import hf_quantization_config, nf4_from_state, nf4_to_state


__all__ = [
    "nf4", "quantize", "NF4Tensor", "NF4Linear", "quantize_model", "NF4Quantizer", "quantizer_for", "saved_in_4bit",
    "memory_report", "MemoryReport", "hf_quantization_config", "nf4_to_state", "nf4_from_state",
]
