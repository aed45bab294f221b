"""`Linear`: nn.Linear with a fast bf16 path on CPUs that have no native bf16 matrix unit.

A bf16 GEMM (on GPUs and on CPUs with AVX512-BF16/AMX) multiplies bf16 inputs, accumulates
in fp32 and rounds the result to bf16 once. On CPUs without those instructions oneDNN's bf16
GEMM is 4-5x slower than its fp32 GEMM (measured: 51 vs 217 GFLOP/s on 2 Xeon cores). So,
there only, we compute the same function through the fp32 kernel: upcast the bf16 operands
(exact), multiply-accumulate in fp32, round the output to bf16 once. The result is what a
native bf16 GEMM gives, up to the order of fp32 additions.

Autograd keeps only the bf16 input and weight (no fp32 copies live until backward); the
backward pass upcasts again. Everywhere else (GPU, fp32, fp16, CPUs with bf16 units) this
is a plain nn.Linear.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


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


class Linear(nn.Linear):
    """nn.Linear whose bf16 CPU matmul takes the fast fp32-kernel path; same parameters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bf16_linear(x, self.weight, self.bias)
