"""Grouped-query self-attention with rotate-half RoPE, a per-layer decoding cache, and
document masking.

Attention runs through `torch.nn.functional.scaled_dot_product_attention`, so the backend
(flash / memory-efficient / math) is chosen by PyTorch; `sdpa_broadcasts_kv_heads` keeps that
choice off the unfused math kernel on CUDA. The plain causal case passes `is_causal=True` and
never builds a T x T mask.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import FULL_ATTENTION, QwenConfig
from .layers import RMSNorm
from .rope import apply_rope
from .linear import Linear


class KVCache:
    """Pre-allocated per-layer decoding state for incremental decoding.

    Full-attention layers: k, v [B, kv_heads, max_len, head_dim]. Qwen3.5's linear-attention
    layers instead carry a fixed-size state whatever the length (and None in k/v):
    conv [B, conv_dim, kernel - 1], the last inputs of the causal conv, and recurrent
    [B, v_heads, key_head_dim, value_head_dim] in float32, the delta-rule state. `length` is
    the number of positions seen, shared by all layers (it advances once per forward, after
    the last layer).
    """

    def __init__(self, config: QwenConfig, batch: int, max_len: int, *, device, dtype):
        n = config.num_hidden_layers
        full = [config.layer_type(i) == FULL_ATTENTION for i in range(n)]
        shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) if full[i] else None for i in range(n)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) if full[i] else None for i in range(n)]
        conv_shape = (batch, config.linear_conv_dim, config.linear_conv_kernel_dim - 1)
        state_shape = (batch, config.linear_num_value_heads, config.linear_key_head_dim, config.linear_value_head_dim)
        self.conv = [None if full[i] else torch.zeros(conv_shape, device=device, dtype=dtype) for i in range(n)]
        self.recurrent = [None if full[i] else torch.zeros(state_shape, device=device, dtype=torch.float32)
                          for i in range(n)]
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k/v [B, kvH, t, D] after the filled part; return all keys/values so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def linear_state(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(conv, recurrent) state of linear-attention layer `layer` (see the class docstring)."""
        return self.conv[layer], self.recurrent[layer]

    def set_linear_state(self, layer: int, conv: torch.Tensor, recurrent: torch.Tensor) -> None:
        self.conv[layer].copy_(conv)
        self.recurrent[layer].copy_(recurrent)

    def advance(self, n: int) -> None:
        self.length += n


def build_attention_mask(
    q_len: int,
    past_len: int,
    *,
    document_ids: Optional[torch.Tensor] = None,
    attention_mask: Optional[torch.Tensor] = None,
    device=None,
) -> Optional[torch.Tensor]:
    """Boolean mask [B or 1, 1, q_len, past_len + q_len] (True = may attend), or None.

    None means "plain causal" (SDPA's is_causal, or no mask at all for one new token).
    document_ids [B, T]: tokens attend only within their own document (packed sequences).
    attention_mask [B, past_len + q_len]: 1 for real tokens, 0 for padding keys.
    """
    if document_ids is None and attention_mask is None:
        return None
    k_len = past_len + q_len
    q_pos = torch.arange(past_len, k_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None, None]  # [1, 1, q, k] causal
    if document_ids is not None:
        if past_len:
            raise ValueError("document_ids are a training-time input; they cannot be combined with a KV cache")
        same_doc = document_ids[:, :, None] == document_ids[:, None, :]  # [B, q, k]
        allowed = allowed & same_doc[:, None]
    if attention_mask is not None:
        if attention_mask.shape[-1] != k_len:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} positions, expected {k_len} "
                f"(cached {past_len} + new {q_len})"
            )
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    # A padding query may have no visible key at all; let every query see itself so SDPA
    # never normalises over an empty set (those rows are ignored downstream anyway).
    allowed = allowed | (k_pos == q_pos)[None, None]
    return allowed


class BlockedMask:
    """The mask of build_attention_mask(T, 0, document_ids=..., attention_mask=...) never built
    whole: attention runs `tile` queries at a time, each block over the keys up to its last query
    (causality), with the [B, 1, tile, keys] part of the mask built for that block alone.

    Exact: a query's softmax is over the same keys as with the whole mask (the keys after the
    block are masked for it anyway). Memory O(tile x T) instead of O(T^2) for the mask; no KV cache.
    """

    def __init__(self, tile: int, *, document_ids: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None):
        if tile <= 0:
            raise ValueError(f"BlockedMask: tile must be positive, got {tile}")
        self.tile = tile
        self.document_ids = document_ids
        self.attention_mask = attention_mask.bool() if attention_mask is not None else None

    def block(self, start: int, end: int, device) -> torch.Tensor:
        """Boolean mask [B or 1, 1, end - start, end] of queries start..end-1 over keys 0..end-1."""
        q_pos = torch.arange(start, end, device=device)[:, None]
        k_pos = torch.arange(end, device=device)[None, :]
        allowed = (k_pos <= q_pos)[None, None]
        if self.document_ids is not None:
            d = self.document_ids
            allowed = allowed & (d[:, start:end, None] == d[:, None, :end])[:, None]
        if self.attention_mask is not None:
            allowed = allowed & self.attention_mask[:, None, None, :end]
        return allowed | (k_pos == q_pos)[None, None]  # as build_attention_mask: a query sees itself


def sdpa_broadcasts_kv_heads(q: torch.Tensor, mask: Optional[torch.Tensor]) -> bool:
    """Whether SDPA gets the KV heads as they are (`enable_gqa=True`) rather than expanded to
    the query heads first. q [B, H, T, D]; mask as passed to SDPA.

    CPU: its flash kernel broadcasts KV heads itself, with or without a mask. CUDA: only the
    flash backend does, and it takes fp16/bf16 and no mask; for anything else (a document or
    padding mask, fp32) PyTorch would fall back to the unfused math kernel, which materialises
    the [B, H, T, T] scores. There the KV heads are expanded (a few MB) and the memory-efficient
    kernel runs. Other devices: expanded, which every backend supports.
    """
    if q.device.type == "cpu":
        return True
    return q.device.type == "cuda" and mask is None and q.dtype in (torch.float16, torch.bfloat16)


class Attention(nn.Module):
    """Qwen2/Qwen3/Qwen3-MoE self-attention. x [B, T, hidden] -> [B, T, hidden]."""

    def __init__(self, config: QwenConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = Linear(config.hidden_size, config.q_size, bias=bias)
        self.k_proj = Linear(config.hidden_size, config.kv_size, bias=bias)
        self.v_proj = Linear(config.hidden_size, config.kv_size, bias=bias)
        # Qwen2 never has an o_proj bias; Qwen3's (and Qwen3-MoE's) attention_bias covers o_proj too.
        o_bias = bias and config.family.o_proj_bias
        self.o_proj = Linear(config.q_size, config.hidden_size, bias=o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: Optional[torch.Tensor],
        cache: Optional[KVCache] = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self.o_proj(self.attend(q, k, v, mask, cache))

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: Optional[torch.Tensor],
        cache: Optional[KVCache] = None,
    ) -> torch.Tensor:
        """Causal SDPA of q [B, H, T, D] over k, v [B, kvH, T, D] (appended to the cache, if
        any) -> [B, T, H * D], the input of o_proj."""
        B, _, T, _ = q.shape
        if isinstance(mask, BlockedMask):
            if cache is not None:
                raise ValueError("a blocked attention mask is for training-time forwards, not a KV cache")
            blocks = [self._sdpa(q[:, :, s : s + mask.tile], k[:, :, : s + mask.tile], v[:, :, : s + mask.tile],
                                 mask.block(s, min(s + mask.tile, T), q.device), False)
                      for s in range(0, T, mask.tile)]
            return torch.cat(blocks, dim=2).transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(self.layer_idx, k, v)
        # Plain causal without a mask: is_causal for a full sequence, nothing for one new
        # token (it may see every cached key). A chunk appended to a cache needs the mask.
        is_causal = mask is None and past == 0 and T > 1
        if mask is None and past > 0 and T > 1:
            mask = build_attention_mask(T, past, attention_mask=torch.ones(B, past + T, device=q.device))
        out = self._sdpa(q, k, v, mask, is_causal)
        return out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)

    def _sdpa(self, q, k, v, mask, is_causal: bool) -> torch.Tensor:
        """SDPA of q [B, H, t, D] over k, v [B, kvH, s, D] -> [B, H, t, D] (KV heads broadcast or expanded)."""
        gqa = self.num_kv_heads != self.num_heads
        if gqa and not sdpa_broadcasts_kv_heads(q, mask):
            groups = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            gqa = False
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)
