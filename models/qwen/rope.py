"""Rotary position embedding: the tables of plain RoPE and of its static scaled variants.

    rope = RotaryEmbedding(head_dim, theta, scaling={"rope_type": "yarn", "factor": 4.0,
                                                      "original_max_position_embeddings": 32768})
    cos, sin = rope(positions [B, T], dtype)      # each [B, T, head_dim]
    q = apply_rope(q [B, H, T, D], cos, sin)

Rope types (the `rope_type` of an HF config's `rope_parameters` / legacy `rope_scaling`), with
the maths of transformers' `modeling_rope_utils`:

* ``default``: inv_freq[i] = theta^(-2i/d).
* ``linear``: inv_freq / factor (position interpolation).
* ``yarn`` (Qwen2.5 / Qwen3 for 128K context): per frequency a blend of the plain (extrapolated)
  and the interpolated (/factor) inverse frequency, with a linear ramp between the dimensions that
  turn `beta_fast` and `beta_slow` times over `original_max_position_embeddings`; cos and sin are
  multiplied by the attention factor (default 0.1 ln(factor) + 1).
* ``llama3``: low frequencies / factor, high ones kept, a smooth blend in between.

All are static: the tables depend on the positions only, never on the sequence length seen so
far, so training, a KV cache and a full forward give the same rotation at every position.
(``dynamic`` and ``longrope`` are not: they are refused by `check_rope_scaling`.)
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

ROPE_TYPES = ("default", "linear", "yarn", "llama3")

# Keys each type reads from rope_parameters (besides rope_type / rope_theta): required, optional.
_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "default": ((), ()),
    "linear": (("factor",), ()),
    "yarn": (("factor", "original_max_position_embeddings"),
             ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate")),
    "llama3": (("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"), ()),
}


def check_rope_scaling(scaling: Optional[dict]) -> Optional[str]:
    """Why `scaling` (None or {"rope_type": ..., params}) cannot be used, or None when it can.

    Returns a message (the caller names its file) instead of raising, so the config reader can
    raise its own error class.
    """
    if scaling is None:
        return None
    rope_type = scaling.get("rope_type")
    if rope_type not in ROPE_TYPES:
        return (f"rope type {rope_type!r} is not supported: expected one of {list(ROPE_TYPES)} "
                "('dynamic' and 'longrope' rescale with the sequence length and are not implemented)")
    required, optional = _KEYS[rope_type]
    missing = [k for k in required if scaling.get(k) is None]
    if missing:
        return f"rope type {rope_type!r} needs {missing[0]!r} in rope_parameters / rope_scaling"
    unknown = sorted(set(scaling) - set(required) - set(optional) - {"rope_type"})
    if unknown:
        return f"rope type {rope_type!r}: unknown parameter {unknown[0]!r} (expected {sorted(required + optional)})"
    for key in ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor",
                "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
        value = scaling.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            return f"rope type {rope_type!r}: {key} must be a non-negative number, got {value!r}"
    if scaling.get("factor") is not None and scaling["factor"] < 1:
        return f"rope type {rope_type!r}: factor must be >= 1, got {scaling['factor']!r}"
    if "truncate" in scaling and not isinstance(scaling["truncate"], bool):
        return f"rope type 'yarn': truncate must be true or false, got {scaling['truncate']!r}"
    if rope_type == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        return "rope type 'llama3': high_freq_factor must be greater than low_freq_factor"
    return None


def default_inv_freq(dim: int, theta: float, device=None) -> torch.Tensor:
    """theta^(-2i/dim) for i < dim/2, float32 [dim/2]."""
    exponent = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (theta**exponent)


def _yarn(dim: int, theta: float, p: dict, device) -> tuple[torch.Tensor, float]:
    factor = float(p["factor"])
    original = p["original_max_position_embeddings"]

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attention_factor = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    # `or`: a 0 (or null) beta means the default, as in transformers.
    beta_fast = p.get("beta_fast") or 32
    beta_slow = p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        """The dimension whose frequency turns `rotations` times over the original context."""
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a zero-width ramp would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(device)
    pos_freqs = theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1: high frequency, kept as is; 0: low frequency, interpolated
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


def _llama3(dim: int, theta: float, p: dict, device) -> torch.Tensor:
    inv_freq = default_inv_freq(dim, theta, device)
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    original = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < original / high) * ~(wavelen > original / low)
    return torch.where(medium, smoothed, scaled)


def rope_tables(dim: int, theta: float, scaling: Optional[dict] = None, device=None) -> tuple[torch.Tensor, float]:
    """(inv_freq float32 [dim/2], attention factor) of a rope type; scaling None = default."""
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        return default_inv_freq(dim, theta, device), 1.0
    if rope_type == "linear":
        return default_inv_freq(dim, theta, device) / scaling["factor"], 1.0
    if rope_type == "yarn":
        return _yarn(dim, theta, scaling, device)
    if rope_type == "llama3":
        return _llama3(dim, theta, scaling, device), 1.0
    raise ValueError(check_rope_scaling(scaling) or f"rope type {rope_type!r} is not supported")


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE tables. positions [B, T] -> (cos, sin) each [B, T, head_dim].

    scaling: None (plain RoPE) or {"rope_type": "linear" | "yarn" | "llama3", ...parameters}.
    The inverse frequencies are a non-persistent buffer: they are never read from or written
    to a checkpoint, and are recomputed in float32 after any `.to(dtype)`.
    """

    def __init__(self, head_dim: int, theta: float, scaling: Optional[dict[str, Any]] = None):
        super().__init__()
        problem = check_rope_scaling(scaling)
        if problem:
            raise ValueError(problem)
        self.head_dim = head_dim
        self.theta = theta
        self.scaling = dict(scaling) if scaling else None
        inv_freq, self.attention_factor = rope_tables(head_dim, theta, self.scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _inv_freq(self, device=None) -> torch.Tensor:
        return rope_tables(self.head_dim, self.theta, self.scaling, device)[0]

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        inv_freq = self.inv_freq
        if inv_freq.dtype != torch.float32:  # a blanket model.to(bf16) must not degrade RoPE
            inv_freq = self._inv_freq(inv_freq.device)
        freqs = positions[..., None].float() * inv_freq  # [B, T, head_dim/2], fp32
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.attention_factor != 1.0:  # YaRN: scales the attention logits by factor^2
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype), sin.to(dtype)

    def extra_repr(self) -> str:
        kind = (self.scaling or {}).get("rope_type", "default")
        return f"head_dim={self.head_dim}, theta={self.theta:g}, rope_type={kind}"


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos/sin [B, T, D] -> x rotated (Qwen's rotate-half convention)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin
