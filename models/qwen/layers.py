"""Building blocks of the Qwen decoder: RMSNorm, rotary position embedding, SwiGLU MLP."""

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


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE tables. positions [B, T] -> (cos, sin) each [B, T, head_dim].

    The inverse frequencies are a non-persistent buffer: they are never read from or written
    to a checkpoint, and are recomputed in float32 after any `.to(dtype)`.
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self, device=None) -> torch.Tensor:
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        return 1.0 / (self.theta**exponent)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        inv_freq = self.inv_freq
        if inv_freq.dtype != torch.float32:  # a blanket model.to(bf16) must not degrade RoPE
            inv_freq = self._inv_freq(inv_freq.device)
        freqs = positions[..., None].float() * inv_freq  # [B, T, head_dim/2], fp32
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos/sin [B, T, D] -> x rotated (Qwen's rotate-half convention)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


class SwiGLU(nn.Module):
    """Qwen MLP: down(silu(gate(x)) * up(x)). x [..., hidden] -> [..., hidden]."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=False)
        self.up_proj = Linear(hidden, intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
