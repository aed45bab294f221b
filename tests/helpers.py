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


def child_threads() -> str:
    """OMP_NUM_THREADS for a script a test runs in a subprocess: the test process's own torch
    thread count (tests/conftest.py: 2 in a serial run, one worker's share under pytest-xdist)."""
    return os.environ.get("TEST_TORCH_THREADS", "2")

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


# ---------------------------------------------------------------------- measured tolerances
# A parity test compares our fp32 result with the reference's fp32 result. How far apart two
# correct fp32 implementations may be depends on the problem (its depth, widths, the CPU's
# kernels: AVX2 and AVX-512 sum in different orders), so no fixed number holds everywhere. The
# floor is measured instead: the reference's own fp32 error against the same reference run in
# float64 on the same weights and inputs. Our error against the reference may be a small multiple
# of that (ours and theirs each carry about one floor of rounding, in different places); a real
# bug (a wrong epsilon, a dropped bias, a weight off by 1e-4) is orders of magnitude above it.
FP32_ULP = 2.0**-23       # one unit in the last place at 1.0: the least a floor can be
FLOOR_FACTOR = 8.0        # ours-vs-ref32 may be this many floors apart


def float64_twin(module: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of `module` (a transformers / PEFT model), for the reference's own floor.

    transformers' MoE experts default to torch._grouped_mm, which has no float64 kernel: the
    twin runs them eagerly (the same function, expert by expert). A bitsandbytes Linear4bit
    becomes a plain linear holding bitsandbytes' own dequantised weight (its NF4 values exactly).
    """
    import copy

    twin = copy.deepcopy(module)
    _dequantise_bitsandbytes(twin)
    torch.nn.Module.to(twin, torch.float64)   # (transformers' own .to refuses a model it quantised)
    for m in twin.modules():   # the copies' configs (a module alone, e.g. one MoE block, has one too)
        if getattr(getattr(m, "config", None), "_experts_implementation", None) not in (None, "eager"):
            m.config._experts_implementation = "eager"
    return twin


def _dequantise_bitsandbytes(model: torch.nn.Module) -> None:
    """Replace every bitsandbytes Linear4bit in `model` by an nn.Linear of its dequantised weight."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for name, child in list(model.named_modules()):
        if isinstance(child, bnb.nn.Linear4bit):
            dense = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
            with torch.no_grad():
                dense.weight.copy_(bnb.functional.dequantize_4bit(child.weight.data, child.weight.quant_state))
                if child.bias is not None:
                    dense.bias.copy_(child.bias)
            dense.requires_grad_(False)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, dense)


def reference_floor(ref32: torch.Tensor, ref64: torch.Tensor) -> float:
    """The reference's own fp32 rounding error: max_rel_err(ref32, ref64), at least one fp32 ulp."""
    return max(max_rel_err(ref32, ref64), FP32_ULP)


def assert_close_to_reference(ours: torch.Tensor, ref32: torch.Tensor, ref64: torch.Tensor,
                              factor: float = FLOOR_FACTOR, what: str = "") -> float:
    """max_rel_err(ours, ref32) <= factor x reference_floor(ref32, ref64); returns the error.

    ours, ref32: the two fp32 results; ref64: the reference computed in float64 on the same
    weights and inputs (e.g. `float64_twin(hf)(ids).logits`).
    """
    floor = reference_floor(ref32, ref64)
    err = max_rel_err(ours, ref32)
    assert err <= factor * floor, (f"{what}: ours is {err:.3g} from the reference, more than {factor:g} x its own "
                                   f"fp32-vs-float64 error {floor:.3g}")
    return err


def assert_matches_formula(ours: torch.Tensor, formula, *tensors: Any, factor: float = FLOOR_FACTOR,
                           what: str = "") -> float:
    """`ours` against an explicit expression `formula(*tensors)`, evaluated on the fp32 tensors
    and on their float64 copies (its floor); non-tensor arguments pass through unchanged."""
    lift = [t.detach().double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors]
    with torch.no_grad():
        ref32 = formula(*(t.detach() if isinstance(t, torch.Tensor) else t for t in tensors))
        ref64 = formula(*lift)
    return assert_close_to_reference(ours, ref32, ref64, factor, what=what or "formula")


def assert_same_function(a32: torch.Tensor, a64: torch.Tensor, b32: torch.Tensor, b64: torch.Tensor,
                         factor: float = FLOOR_FACTOR, what: str = "") -> float:
    """Two fp32 evaluations of one function in different summation orders (merged against
    unmerged weights, accumulated against one batch): max_rel_err(a32, b32) within `factor` x
    the sum of each one's own fp32-vs-float64 error (a64, b64: the same two computations run on
    float64 copies of their own weights and inputs, so a bug in either is not in its floor)."""
    floor = reference_floor(a32, a64) + reference_floor(b32, b64)
    err = max_rel_err(a32, b32)
    assert err <= factor * floor, (f"{what}: the two are {err:.3g} apart, more than {factor:g} x the sum of their "
                                   f"fp32-vs-float64 errors {floor:.3g}")
    return err


def assert_logits_match(ours: torch.Tensor, ref: torch.nn.Module, *args: Any, factor: float = FLOOR_FACTOR,
                        **kwargs: Any) -> float:
    """`ours` [B, T, V] against `ref(*args, **kwargs).logits` in fp32, within `factor` x the
    floor measured by running `ref`'s float64 twin on the same inputs (under no_grad)."""
    with torch.no_grad():
        ref32 = ref(*args, **kwargs).logits
        ref64 = float64_twin(ref)(*args, **kwargs).logits
    return assert_close_to_reference(ours, ref32, ref64, factor, what=type(ref).__name__)


def assert_grads_match(ours: torch.nn.Module, ref: torch.nn.Module, *args: Any, ref_grad=None,
                       factor: float = FLOOR_FACTOR, **kwargs: Any) -> list:
    """The loss and every trainable gradient of `ours` against `ref`'s (fp32), within `factor` x
    the floor measured on `ref`'s float64 twin. Runs `model(*args, **kwargs)` (with labels: our
    loss tensor, transformers' output .loss) + backward on all three models; returns their
    outputs [ours, ref, twin].

    The gradients share one floor, the largest of the reference's per-tensor errors: one tensor's
    own error is a single sample (Qwen3.5's A_log gradient: 5.7e-7 with one seed, 2.8e-6 with
    the next, ours 1.4e-6 to 5e-6 on both), the backward pass's floor is their maximum.
    ref_grad(model, name) -> the gradient in `model` (ref or its twin) of our parameter `name`
    (default: the same name). A reference gradient of exactly zero (an expert no token reached)
    must be zero (or None) in ours.
    """
    twin = float64_twin(ref)
    outputs = [m(*args, **kwargs) for m in (ours, ref, twin)]
    losses = [out if isinstance(out, torch.Tensor) else out.loss for out in outputs]
    for loss in losses:
        loss.backward()
    assert_close_to_reference(*(loss.detach() for loss in losses), factor, what="loss")
    assert_grads_close(ours, ref, twin, ref_grad, factor)
    return outputs


def assert_grads_close(ours: torch.nn.Module, ref: torch.nn.Module, twin: torch.nn.Module, ref_grad=None,
                       factor: float = FLOOR_FACTOR) -> None:
    """After the same backward on all three: each trainable .grad of `ours` within `factor` x
    the largest of ref's per-tensor errors against its float64 `twin` (see assert_grads_match)."""
    ref_grad = ref_grad or (lambda model, name: model.get_parameter(name).grad)
    triples = {}
    for name, p in ours.named_parameters():
        if not p.requires_grad:
            continue
        want32, want64 = ref_grad(ref, name), ref_grad(twin, name)
        if want32 is None or not want32.any():
            assert p.grad is None or not p.grad.any(), name
        else:
            triples[name] = (p.grad, want32, want64)
    assert triples, "no gradient to compare"
    floor = max(reference_floor(r32, r64) for _, r32, r64 in triples.values())
    for name, (grad, want32, _) in triples.items():
        err = max_rel_err(grad, want32)
        assert err <= factor * floor, (f"{name}.grad: ours is {err:.3g} from the reference, more than {factor:g} x "
                                       f"its backward's fp32-vs-float64 error {floor:.3g}")
