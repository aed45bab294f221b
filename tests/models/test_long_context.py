"""The long-context paths against references: the tiled MLP against the untiled SwiGLU, the
blocked-mask attention against an explicit float64 softmax attention, chunked prefill against
one-pass prefill. Bounds: each fast path's error against the float64 computation may be at most
a small multiple of the plain fp32 path's own error against it (the reference's floor)."""

from __future__ import annotations

import math

import pytest
import torch

from models.qwen import Qwen, QwenConfig, generate
from models.qwen.attention import Attention, BlockedMask, build_attention_mask
from models.qwen.layers import SwiGLU, tiled
from models.qwen.model import offload_context

from tests.helpers import TINY_QWEN2


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def test_tiled_mlp_equals_untiled_values_and_grads():
    torch.manual_seed(0)
    mlp = SwiGLU(48, 88)
    x = torch.randn(2, 37, 48)
    w = torch.randn(2, 37, 48)  # a random upstream gradient

    def run(module, inp, tile):
        inp = inp.clone().requires_grad_(True)
        out = tiled(module, inp, tile) if tile else module(inp)
        (out * w.to(out.dtype)).sum().backward()
        grads = [inp.grad] + [p.grad for p in module.parameters()]
        for p in module.parameters():
            p.grad = None
        return out.detach(), grads

    mlp64 = SwiGLU(48, 88).double()
    mlp64.load_state_dict({k: v.double() for k, v in mlp.state_dict().items()})
    out64, g64 = run(mlp64, x.double(), 0)
    out32, g32 = run(mlp, x, 0)
    for tile in (5, 16):  # 74 tokens: tiles that do and do not divide it
        out_t, g_t = run(mlp, x, tile)
        floor = _max_err(out32, out64)
        assert _max_err(out_t, out64) <= 2 * floor + 1e-7, tile
        for a, b, c in zip(g_t, g32, g64):
            assert _max_err(a, c) <= 2 * _max_err(b, c) + 1e-7, tile
    # and the tiled path really is tiled: fewer rows than T in each MLP call
    rows = []
    h = mlp.gate_proj.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[-2]))
    with torch.no_grad():
        tiled(mlp, x, 16)
    h.remove()
    assert max(rows) == 16 and sum(rows) == 74


def _reference_attention(q, k, v, allowed):
    """Explicit float64 softmax attention; q [B, H, T, D], k/v [B, kvH, T, D], allowed [B|1, 1, T, T]."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(groups, 1), v.double().repeat_interleave(groups, 1)
    scores = q.double() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


@pytest.mark.parametrize("with_padding", [False, True])
def test_blocked_mask_attention_equals_float64_reference(with_padding):
    torch.manual_seed(1)
    cfg = QwenConfig(**{**TINY_QWEN2, "torch_dtype": "float32"})
    attn = Attention(cfg, 0)
    B, T, H, kvH, D = 2, 45, 4, 2, cfg.head_dim
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, kvH, T, D), torch.randn(B, kvH, T, D)
    docs = torch.tensor([[0] * 10 + [1] * 20 + [2] * 15, [0] * 30 + [1] * 15])
    pad = torch.ones(B, T, dtype=torch.long)
    if with_padding:
        pad[1, -6:] = 0
    amask = pad if with_padding else None
    full = build_attention_mask(T, 0, document_ids=docs, attention_mask=amask)
    ref = _reference_attention(q, k, v, full)
    whole = attn.attend(q, k, v, full)
    floor = _max_err(whole, ref)
    for tile in (7, 16, 64):
        blocked = attn.attend(q, k, v, BlockedMask(tile, document_ids=docs, attention_mask=amask))
        assert _max_err(blocked, ref) <= 2 * floor + 1e-6, tile


def test_long_forward_switches_tiling_on_and_matches_the_untiled_model():
    """The model's own switch: past auto_from tokens, tiled MLP + blocked mask, same loss and grads."""
    torch.manual_seed(2)
    cfg = QwenConfig(**{**TINY_QWEN2, "torch_dtype": "float32"})
    model = Qwen(cfg).double()
    model.enable_gradient_checkpointing(True)
    ids = torch.randint(0, cfg.vocab_size, (2, 60))
    docs = (torch.arange(60) >= 25).long().expand(2, 60)
    out = {}
    for name, auto_from in (("whole", 10**9), ("tiled", 0)):
        model.long_context.auto_from, model.long_context.mlp_tile, model.long_context.attention_tile = auto_from, 16, 16
        model.zero_grad()
        loss = model(ids, labels=ids, document_ids=docs)
        loss.backward()
        out[name] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    # float64 on both sides: tiling changes the summation order only, far below any fp32 effect
    assert _max_err(out["whole"][0], out["tiled"][0]) < 1e-12
    assert max(_max_err(a, b) for a, b in zip(out["whole"][1], out["tiled"][1])) < 1e-12


def test_offload_refused_on_cpu_and_the_context_keeps_gradients():
    with pytest.raises(ValueError, match="needs the model on a GPU"):
        offload_context(torch.device("cpu"), True)
    cfg = QwenConfig(**{**TINY_QWEN2, "torch_dtype": "float32"})
    model = Qwen(cfg).enable_gradient_checkpointing(True)
    ids = torch.randint(0, cfg.vocab_size, (1, 20))
    model(ids, labels=ids).backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with torch.autograd.graph.save_on_cpu():  # the context offload uses on a GPU, run here on CPU tensors
        model(ids, labels=ids).backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(want, model.parameters()))
    model.long_context.offload_inputs = True
    with pytest.raises(ValueError, match="needs the model on a GPU"):
        model(ids, labels=ids)


@pytest.mark.parametrize("padded", [False, True])
def test_chunked_prefill_greedy_equals_one_pass(padded):
    torch.manual_seed(3)
    cfg = QwenConfig(**{**TINY_QWEN2, "torch_dtype": "float32"})
    model = Qwen(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 37))
    mask = None
    if padded:
        mask = torch.ones(2, 37, dtype=torch.long)
        mask[1, :9] = 0  # left padding
    one = generate(model, ids, max_new_tokens=12, eos_ids=[], attention_mask=mask, prefill_chunk=None)
    for chunk in (5, 16):
        calls = []
        h = model.model.layers[0].register_forward_hook(lambda m, i, o: calls.append(i[0].shape[1]))
        out = generate(model, ids, max_new_tokens=12, eos_ids=[], attention_mask=mask, prefill_chunk=chunk)
        h.remove()
        assert torch.equal(out, one), chunk
        assert max(calls) <= chunk  # the prompt went in chunks

