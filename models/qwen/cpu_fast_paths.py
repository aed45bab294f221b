"""The CPU fast paths, in one place: the same functions as the plain code, computed faster on a
CPU. Off the CPU each falls back to the plain PyTorch call. Why each exists, with the measurements
behind it, is in benchmarks/RESULTS.md ("CPU fast paths"); benchmarks/components.py switches
each one off and on in one run.

    scratch(shape, dtype, device, slot)     reused memory for short-lived temporaries
    cast_shared(x, dtype, slot)             one cast of an input shared by the layers that read it
    bf16_linear(x, w, b)                    a bf16 matmul through fp32 kernels where the CPU has no
                                            bf16 unit (the result a native bf16 GEMM rounds to)
    CPU_SOFTMAX_ROWS                        rows of the loss's fp32 softmax per pass (cache-sized)

Why reuse memory: on a CPU every large fresh tensor is new memory from the OS, and the first write
to each page is a page fault (glibc hands big blocks back to the kernel on free). GPUs have
PyTorch's caching allocator and need none of this.
"""

from __future__ import annotations

import functools
import threading
import weakref
from typing import Optional

import torch
import torch.nn.functional as F

# Rows of fp32 softmax done at a time by the chunked loss on CPU: 8 x 151936 x 4 B = 4.9 MB stays
# in cache, so its upcast, softmax and downcast passes run at cache speed instead of DRAM speed.
CPU_SOFTMAX_ROWS = 8

_local = threading.local()


def scratch(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, slot: str) -> torch.Tensor:
    """An uninitialised contiguous tensor `shape`, valid until the next call with the same
    (slot, dtype, device) on this thread. A slot is a name its user owns (a module constant of the
    package that uses it, e.g. "<package>.<what>"). For temporaries that are used at once and kept by
    nobody (never return one to a caller, never save one for backward).

    Each slot holds one buffer that grows to the largest request and is reused for smaller
    ones, so variable batch shapes cost at most the largest of them per slot.
    """
    device = torch.device(device)
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    numel = 1
    for s in shape:
        numel *= int(s)
    buffers = _local.__dict__.setdefault("buffers", {})
    key = (slot, dtype, device)
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        buf = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel].view(shape)


def cast_shared(x: torch.Tensor, dtype: torch.dtype, slot: str) -> torch.Tensor:
    """`x` cast to `dtype`, [N, x.shape[-1]]; computed once for consecutive calls with the same
    unchanged tensor `x` (q/k/v, or gate/up, all cast the same block input for their adapters).

    The result lives in the scratch of `slot` (see `scratch`): valid until the next call of
    this function with that slot and another input; use it at once, never keep it.
    """
    flat = x.reshape(-1, x.shape[-1])
    if x.dtype == dtype:
        return flat
    if x.device.type != "cpu":  # no scratch off the CPU, and no memo that would keep x's cast alive
        return flat.to(dtype)
    memo = _local.__dict__.setdefault("casts", {})
    key = (slot, dtype, x.device)
    hit = memo.get(key)
    if hit is not None:
        ref, version, cast = hit
        if ref() is x and x._version == version:
            return cast
    cast = scratch(tuple(flat.shape), dtype, x.device, "cast:" + slot).copy_(flat)
    memo[key] = (weakref.ref(x), x._version, cast)
    return cast


# ---------------------------------------------------------------------- bf16 matmuls on CPUs without bf16 units
# A bf16 GEMM (on GPUs and on CPUs with AVX512-BF16/AMX) multiplies bf16 inputs, accumulates in
# fp32 and rounds the result to bf16 once. On CPUs without those instructions oneDNN's bf16 GEMM
# is several times slower than its fp32 GEMM, so there the same function is computed through the
# fp32 kernel: upcast the bf16 operands (exact), multiply-accumulate in fp32, round once. Autograd
# keeps only the bf16 input and weight; the backward pass upcasts again.

@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX tiles)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except Exception:  # older torch: assume native, i.e. never take the upcast path
        return True


def use_upcast_matmul(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a bf16 matmul of x and weight should run through the fp32 kernel."""
    if x.device.type != "cpu" or cpu_has_native_bf16():
        return False
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu") == torch.bfloat16
    return x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16


class _UpcastLinear(torch.autograd.Function):
    """y = round_bf16(x @ w.T + b) computed with fp32 kernels; x [..., in], w [out, in]."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        out = F.linear(x.float(), weight.float(), bias.float() if bias is not None else None)
        return out.to(torch.bfloat16)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        g = grad_out.float()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight.float()).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).float()).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.reshape(-1, g.shape[-1]).sum(0).to(torch.bfloat16)
        return grad_x, grad_w, grad_b


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear with the CPU bf16 upcast path when it applies (see module docstring)."""
    if not use_upcast_matmul(x, weight):
        return F.linear(x, weight, bias)
    bf16 = torch.bfloat16
    x, weight = x.to(bf16), weight.to(bf16)
    bias = bias.to(bf16) if bias is not None else None
    with torch.autocast("cpu", enabled=False):
        return _UpcastLinear.apply(x, weight, bias)


def upcast_matmul_dtype(x: torch.Tensor, weight: torch.Tensor) -> Optional[torch.dtype]:
    """torch.float32 when a bf16 product of x and weight should use fp32 kernels, else None."""
    return torch.float32 if use_upcast_matmul(x, weight) else None


