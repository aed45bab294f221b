"""Qwen3.5's full-attention pieces: the zero-centred RMSNorm and gated attention with partial RoPE.

Qwen3.5 text models (transformers' `Qwen3_5ForCausalLM`) interleave Gated DeltaNet layers
(linear_attention.py) with these full-attention layers. Module and parameter names are the
checkpoint's: `self_attn.{q_proj, k_proj, v_proj, o_proj, q_norm, k_norm}`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .attention import Attention, KVCache
from .config import QwenConfig
from .rope import apply_rope
from .linear import Linear


class ZeroCentredRMSNorm(nn.Module):
    """RMSNorm whose weight is stored as an offset from 1: norm(x) * (1 + w), all in float32.

    x: [..., dim] -> [..., dim] in x's dtype. Unlike `RMSNorm` the weight multiply happens in
    float32 before the cast back (as transformers' Qwen3_5RMSNorm does). Initialised to w = 0.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the leading cos.shape[-1] dims of x [B, H, T, D]; the rest pass unchanged."""
    rotary = cos.shape[-1]
    if rotary == x.shape[-1]:
        return apply_rope(x, cos, sin)
    return torch.cat((apply_rope(x[..., :rotary], cos, sin), x[..., rotary:]), dim=-1)


class GatedAttention(Attention):
    """Qwen3.5 full attention. x [B, T, hidden] -> [B, T, hidden].

    q_proj yields, per head, [query | gate] (2 * head_dim); the attention output is scaled by
    sigmoid(gate) before o_proj. q and k get a zero-centred RMSNorm per head, then RoPE on
    their first `rotary_dim` dims (partial_rotary_factor of head_dim). attention_bias covers
    all four projections.
    """

    def __init__(self, config: QwenConfig, layer_idx: int):
        # Attention's own __init__ would build (and initialise) the Qwen2/3 projections and
        # norms only for them to be replaced: set up the shared attributes here instead.
        nn.Module.__init__(self)
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = Linear(config.hidden_size, 2 * config.q_size, bias=bias)
        self.k_proj = Linear(config.hidden_size, config.kv_size, bias=bias)
        self.v_proj = Linear(config.hidden_size, config.kv_size, bias=bias)
        self.o_proj = Linear(config.q_size, config.hidden_size, bias=bias)
        self.q_norm = ZeroCentredRMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = ZeroCentredRMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: Optional[torch.Tensor],
        cache: Optional[KVCache] = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, gate = self.q_proj(x).view(B, T, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
        q = self.q_norm(q).transpose(1, 2)  # [B, H, T, D]
        k = self.k_norm(self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
        out = self.attend(q, k, v, mask, cache)  # [B, T, H * D]
        return self.o_proj(out * torch.sigmoid(gate.reshape(B, T, -1)))
