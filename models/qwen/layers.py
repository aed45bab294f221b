"""Building blocks of the Qwen decoder: RMSNorm and the SwiGLU MLP (rotary embedding: rope.py),
and `tiled`, which runs a per-token module over the sequence in tiles."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

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


def tiled(module: nn.Module, x: torch.Tensor, tile: int) -> torch.Tensor:
    """module(x) for a per-token module (each output position depends on its own input only),
    x [B, T, hidden] -> [B, T, hidden], computed `tile` tokens at a time.

    Under autograd each tile runs in a non-reentrant checkpoint: only the tile's input (a view of
    x) is kept and its inner activations ([tile, intermediate] for the SwiGLU) are recomputed
    tile by tile in backward, so the MLP's [T, intermediate] activations never exist whole. The
    values are those of module(x): the same matmuls on fewer rows. tile <= 0 or a sequence that
    fits one tile: module(x) as it is.
    """
    B, T, H = x.shape
    n = B * T
    if tile <= 0 or n <= tile:
        return module(x)
    flat = x.reshape(n, H)
    pieces = []
    grad = torch.is_grad_enabled()
    for start in range(0, n, tile):
        part = flat[start : start + tile][None]
        pieces.append(checkpoint(module, part, use_reentrant=False) if grad else module(part))
    return torch.cat(pieces, dim=1).view(B, T, -1)
