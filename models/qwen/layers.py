"""Building blocks of the Qwen decoder: RMSNorm and the SwiGLU MLP (rotary embedding: rope.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .linear import Linear


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim, computed in float32 (as Qwen2RMSNorm does).

    x: [..., dim] -> [..., dim] in x's dtype.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        # Cast back before the weight multiply: the reference does weight * h.to(dtype).
        return self.weight * h.to(dtype)


class SwiGLU(nn.Module):
    """Qwen MLP: down(silu(gate(x)) * up(x)). x [..., hidden] -> [..., hidden]."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=False)
        self.up_proj = Linear(hidden, intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
