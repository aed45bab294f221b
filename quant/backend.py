"""Optional bitsandbytes dequantisation kernels; the pure-PyTorch codec is the reference.

`import quant` must work when bitsandbytes is missing or fails to load (a broken CUDA setup
raises all sorts of exceptions at import), so any exception disables the fast path.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from .nf4 import NF4Tensor

# bitsandbytes logs a warning at import on CPUs with AVX512-BF16 when the optional `kernels`
# package is missing ("Failed to load CPU gemm_4bit_forward ... pip install kernels"); we never
# call that kernel, so the line would only be noise a user cannot act on.
_cpu_ops_log = logging.getLogger("bitsandbytes.backends.cpu.ops")
_level = _cpu_ops_log.level
_cpu_ops_log.setLevel(logging.ERROR)
try:  # noqa: SIM105 - any failure (ImportError, OSError, RuntimeError...) means "not available"
    import bitsandbytes.functional as _bnbf
except Exception:  # pragma: no cover - depends on the machine
    _bnbf = None
finally:
    _cpu_ops_log.setLevel(_level)


def available() -> bool:
    """True when bitsandbytes imported (its kernels may serve `dequantize`)."""
    return _bnbf is not None


def serves(q: NF4Tensor) -> bool:
    """Whether `dequantize(q, ...)` takes bitsandbytes' kernel (else the PyTorch codec).

    CUDA: always. CPU: only when every row holds whole blocks (in_features % blocksize == 0,
    true of every Qwen linear): bitsandbytes' AVX-512 CPU kernel indexes the block scales per
    row and is wrong otherwise (tests/quant/test_codec.py keeps that case documented). Where
    it is right it gives our codec's exact values, 3-9x faster on this project's CPU.
    """
    if _bnbf is None:
        return False
    device = q.packed.device.type
    if device == "cuda":
        return True
    return device == "cpu" and len(q.shape) >= 1 and int(q.shape[-1]) % q.blocksize == 0


def dequantize(q: NF4Tensor, dtype: torch.dtype, out: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """bitsandbytes' dequantisation of `q` in `dtype`, or None to use the PyTorch path.

    Same arithmetic as `NF4Tensor.dequantize` (level * fp32 absmax, one rounding), so both
    give identical values; only tensors `serves(q)` accepts take this path.
    """
    if not serves(q):
        return None
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
