"""The LoRA update y = base_out + scale · (x·Aᵀ)·Bᵀ computed with the fewest temporaries: the fast
path behind `LoRALinear.forward` (which reads as the formula). Why it exists, and what it saves,
is in benchmarks/RESULTS.md ("CPU fast paths"); the plain computation is the reference the tests
compare it with.

    y = lora_update(base_out, x, A, B, scale, dropout)

Under autocast (where F.linear picks the dtype itself) it is the plain formula. Otherwise it is
one autograd function with PEFT's arithmetic: the update in A's dtype (fp32) added to the upcast
base output and rounded once, with dropout after the cast to the adapter dtype (a bf16 dropout
would round x / (1 - p) to bf16), as PEFT does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.qwen.cpu_fast_paths import cast_shared, scratch

# Slots of `scratch` (models.qwen.cpu_fast_paths): one buffer each, reused by every call of that slot on a thread.
LORA_X = "lora.x"             # the fp32 cast of a LoRA layer's input (cast_shared)
LORA_Y = "lora.y"             # the fp32 sum base_out + update
LORA_GRAD_Y = "lora.grad_y"   # the fp32 upcast of the incoming gradient
LORA_GRAD_X = "lora.grad_x"   # the fp32 gradient of the input before its cast back


def lora_update(base_out: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                dropout: nn.Module) -> torch.Tensor:
    """base_out [..., out] + scale · B(A(dropout(x))), x [..., in], A [r, in], B [out, r] -> [..., out]
    in base_out's dtype."""
    if torch.is_autocast_enabled(x.device.type):
        update = F.linear(F.linear(dropout(x), A), B)     # (x·Aᵀ)·Bᵀ: never B·A
        return base_out + (update * scale).to(base_out.dtype)
    x_d = dropout(x.to(A.dtype)) if not isinstance(dropout, nn.Identity) else x
    return _LoRAUpdate.apply(base_out, x_d, A, B, scale)


class _LoRAUpdate(torch.autograd.Function):
    """y = round(base_out + scale · (x·Aᵀ)·Bᵀ), the adapter math in A's dtype (fp32).

    base_out [..., out] (the frozen layer's output, e.g. bf16), x [..., in] (its input after
    dropout), A [r, in], B [out, r] -> y [..., out] in base_out's dtype. This is PEFT's
    function (it adds the fp32 update to the upcast base output, then rounds once), computed
    with one addmm and without the intermediates autograd would keep: backward saves only x
    (in its own dtype) and x·Aᵀ [N, r], where the autograd version keeps an fp32 copy of x
    and allocates three [N, out] temporaries per call.

    The fp32 temporaries are CPU scratch (`models.qwen.cpu_fast_paths`), and the fp32 cast of x is
    shared by the adapters that read the same input (q/k/v, gate/up), in forward and backward.
    """

    @staticmethod
    def forward(ctx, base_out, x, A, B, scale: float):
        n_out = B.shape[0]
        xa = cast_shared(x, A.dtype, LORA_X) @ A.t()  # [N, r]
        base = base_out.reshape(-1, n_out)
        ctx.save_for_backward(x, xa, A, B)
        ctx.scale = scale
        if base_out.dtype == A.dtype:
            return torch.addmm(base, xa, B.t(), alpha=scale).view(base_out.shape)
        y = scratch(tuple(base.shape), A.dtype, base.device, LORA_Y).copy_(base)
        return y.addmm_(xa, B.t(), alpha=scale).to(base_out.dtype).view(base_out.shape)

    @staticmethod
    def backward(ctx, grad_y):
        x, xa, A, B = ctx.saved_tensors
        need_base, need_x, need_A, need_B = ctx.needs_input_grad[:4]
        g = grad_y.reshape(-1, B.shape[0])  # [N, out]
        if g.dtype != A.dtype:
            g = scratch(tuple(g.shape), A.dtype, g.device, LORA_GRAD_Y).copy_(g)
        grad_x = grad_A = grad_B = None
        if need_B:
            grad_B = (g.t() @ xa).mul_(ctx.scale)  # [out, r]
        if need_x or need_A:
            g_xa = (g @ B).mul_(ctx.scale)  # [N, r]
            if need_A:
                grad_A = g_xa.t() @ cast_shared(x, A.dtype, LORA_X)  # [r, in]
            if need_x:
                if x.dtype == A.dtype:
                    grad_x = (g_xa @ A).view(x.shape)
                else:
                    out = scratch((g_xa.shape[0], A.shape[1]), A.dtype, g.device, LORA_GRAD_X)
                    grad_x = torch.mm(g_xa, A, out=out).to(x.dtype).view(x.shape)
        return (grad_y if need_base else None), grad_x, grad_A, grad_B, None
