"""Optional bitsandbytes dequantisation kernels; the pure-PyTorch codec is the reference.

bitsandbytes is imported on the first NF4 dequantisation, not with `quant`: importing it pulls
in torch._dynamo / inductor (sympy, networkx: ~120 MiB and seconds), which a LoRA run that never
touches an NF4 weight (and `import lora`, which imports quant.NF4Linear) should not pay. Any
exception while importing it (a broken CUDA setup raises all sorts) disables the fast path.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Optional

import torch

from .nf4 import NF4Tensor


@functools.lru_cache(maxsize=None)
def _bitsandbytes() -> Optional[Any]:
    """bitsandbytes.functional, or None when it is missing or cannot load."""
    # bitsandbytes logs a warning at import on CPUs with AVX512-BF16 when the optional `kernels`
    # package is missing ("Failed to load CPU gemm_4bit_forward ... pip install kernels"); we
    # never call that kernel, so the line would only be noise a user cannot act on.
    cpu_ops_log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = cpu_ops_log.level
    cpu_ops_log.setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as bnbf
    except Exception:  # pragma: no cover - depends on the machine
        return None
    finally:
        cpu_ops_log.setLevel(level)
    return bnbf


def available() -> bool:
    """True when bitsandbytes imports (its kernels may serve `dequantize`)."""
    return _bitsandbytes() is not None


def serves(q: NF4Tensor) -> bool:
    """Whether `dequantize(q, ...)` takes bitsandbytes' kernel (else the PyTorch codec).

    CUDA: always. CPU: only when every row holds whole blocks (in_features % blocksize == 0,
    true of every Qwen linear): bitsandbytes' AVX-512 CPU kernel indexes the block scales per
    row and is wrong otherwise (tests/quant/test_codec.py keeps that case documented). Where
    it is right it gives our codec's exact values, 3-9x faster on this project's CPU.
    """
    device = q.packed.device.type
    if device == "cuda":
        shape_ok = True
    else:
        shape_ok = device == "cpu" and len(q.shape) >= 1 and int(q.shape[-1]) % q.blocksize == 0
    return shape_ok and available()


def dequantize(q: NF4Tensor, dtype: torch.dtype, out: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """bitsandbytes' dequantisation of `q` in `dtype`, or None to use the PyTorch path.

    Same arithmetic as `NF4Tensor.dequantize` (level * fp32 absmax, one rounding), so both
    give identical values; only tensors `serves(q)` accepts take this path.
    """
    if not serves(q):
        return None
    _bnbf = _bitsandbytes()
    state2 = None
    offset = None
    if q.double_quant:
        state2 = _bnbf.QuantState(absmax=q.nested_absmax, code=q.nested_code, blocksize=q.nested_blocksize, dtype=torch.float32)
        offset = torch.tensor(q.offset, dtype=torch.float32, device=q.packed.device)
    state = _bnbf.QuantState(
        absmax=q.absmax, shape=torch.Size(q.shape), code=q.code, blocksize=q.blocksize,
        quant_type="nf4", dtype=dtype, offset=offset, state2=state2,
    )
    try:
        result = _bnbf.dequantize_4bit(q.packed, state, quant_type="nf4")
    except Exception:  # pragma: no cover - a kernel that cannot run here: use the reference path
        return None
    if out is not None:
        return out.copy_(result)
    return result
