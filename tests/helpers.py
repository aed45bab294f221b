"""Shared test helpers: tiny random Qwen checkpoints written by transformers itself.

The reference implementation builds and saves the model, so every test that loads one with
our code compares against numbers we did not produce.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

# The devices a reference test runs on: always the CPU; CUDA where a GPU is visible (on a lent
# GPU machine: `benchmarks/device_check.sh`, or `pytest -m cuda`). CI has no GPU, so there the
# CUDA case is reported as skipped, and the CPU case runs the same assertions.
CUDA = pytest.param(
    "cuda",
    marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")],
)
DEVICES = ["cpu", CUDA]

# Small odd shapes: GQA (4 query heads over 2 KV heads), an MLP width that is not a
# multiple of the hidden size, and a vocabulary large enough to hold Qwen's special ids is
# not needed for logits tests, so keep it small.
TINY_QWEN2 = dict(
    vocab_size=320,
    hidden_size=48,
    intermediate_size=88,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
)

TINY_QWEN3 = dict(TINY_QWEN2, head_dim=20)  # head_dim != hidden/heads, as in real Qwen3

# Qwen3-MoE: 6 experts of width 24, top 2 (Qwen3-30B-A3B: 128 of 768, top 8), renormalised.
TINY_QWEN3_MOE = dict(TINY_QWEN3, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24,
                      norm_topk_prob=True)


def hf_config(kind: str = "qwen2", **overrides: Any):
    """A transformers Qwen2Config / Qwen3Config / Qwen3MoeConfig of the tiny test shape."""
    from transformers import Qwen2Config, Qwen3Config, Qwen3MoeConfig

    if kind == "qwen2":
        values = dict(TINY_QWEN2)
        values.update(overrides)
        return Qwen2Config(**values)
    if kind == "qwen3":
        values = dict(TINY_QWEN3)
        values.update(overrides)
        return Qwen3Config(**values)
    if kind == "qwen3_moe":
        values = dict(TINY_QWEN3_MOE)
        values.update(overrides)
        return Qwen3MoeConfig(**values)
    raise ValueError(kind)


def hf_model(kind: str = "qwen2", seed: int = 0, **overrides: Any):
    """A tiny transformers Qwen2ForCausalLM / Qwen3ForCausalLM / Qwen3MoeForCausalLM with random
    fp32 weights.

    Biases and norm weights are randomised too (HF initialises them to 0 / 1, which would
    hide a loader that forgets them).
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = hf_config(kind, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    return model


def save_hf_model(model, path: os.PathLike, **kwargs: Any) -> Path:
    """save_pretrained into `path` (safetensors; pass max_shard_size to shard)."""
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return path


def tiny_checkpoint(path: os.PathLike, kind: str = "qwen2", seed: int = 0, **overrides: Any):
    """Write a tiny random HF checkpoint to `path`; returns (path, hf_model)."""
    model = hf_model(kind, seed=seed, **overrides)
    save_hf_model(model, path)
    return Path(path), model


def random_ids(batch: int, length: int, vocab: int = TINY_QWEN2["vocab_size"], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a-b| / max |b|: the relative error measure of the acceptance criteria."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
