"""NF4Linear: forward / input gradient equal bitsandbytes' Linear4bit on the same weight; nothing dense saved for backward; bnb state-dict keys; LoRA trains on it."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quant
from quant import NF4Linear
from tests.helpers import DEVICES, assert_close_to_reference

bnbf = pytest.importorskip("bitsandbytes.functional")


def _linear(inp=128, out=96, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(inp, out, bias=bias)
    with torch.no_grad():
        if bias:
            lin.bias.normal_()
    return lin


def _bnb_weight(lin, dtype):
    """Independent reference: bitsandbytes quantise -> dequantise, rounded once to dtype."""
    packed, state = bnbf.quantize_4bit(lin.weight.detach(), quant_type="nf4", compress_statistics=True, blocksize=64)
    state.dtype = dtype
    return bnbf.dequantize_4bit(packed, state, quant_type="nf4")


def _bnb_linear4bit(lin, dtype, device):
    """bitsandbytes' own Linear4bit over `lin`'s weight (NF4, double quant, block 64), computing in
    `dtype` on its exact dequantise + matmul path (see tests/quant/test_load.py::_exact_bnb_kernels)."""
    bnb = pytest.importorskip("bitsandbytes")
    ref = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=dtype,
                            quant_type="nf4", compress_statistics=True)
    ref.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                   compress_statistics=True, blocksize=64)
    if lin.bias is not None:
        ref.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    ref = ref.to(device)   # quantises here
    ref.support_avx512bf16_for_cpu = False
    return ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("device", DEVICES)
def test_forward_and_input_grad_match_bitsandbytes_linear4bit(device, dtype, bias):
    """Output and input gradient against bitsandbytes' Linear4bit on the same weight, within 8x
    bitsandbytes' own error against the float64 product with the dequantised weight."""
    lin = _linear(bias=bias).to(device)
    layer = NF4Linear.from_linear(lin, compute_dtype=dtype)
    w = _bnb_weight(lin, dtype)
    assert torch.equal(layer.dequantize(), w) and layer.dequantize().dtype == dtype
    ref = _bnb_linear4bit(lin, dtype, device)

    x = torch.randn(2, 5, 128, dtype=dtype, device=device, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = layer(x), ref(x_ref)
    assert y.shape == (2, 5, 96) and y.dtype == dtype  # no silent fp32
    w64 = w.double()
    y64 = F.linear(x.detach().double(), w64, None if not bias else lin.bias.detach().to(dtype).double())
    assert_close_to_reference(y, y_ref, y64, what="output")
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert_close_to_reference(x.grad, x_ref.grad, g.double() @ w64, what="input gradient")
    # frozen: no parameter gets a gradient
    assert all(not p.requires_grad and p.grad is None for p in layer.parameters())


def test_backward_saves_no_dense_weight():
    layer = NF4Linear.from_linear(_linear(256, 192), compute_dtype=torch.float32)
    saved = []
    x = torch.randn(3, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = layer(x)
    assert all(n < 256 * 192 for n in saved), saved  # only activations, never W [192, 256]
    y.sum().backward()
    assert x.grad is not None


def test_reused_buffer_gives_same_values():
    lin = _linear()
    a = NF4Linear.from_linear(lin, compute_dtype=torch.bfloat16)
    b = NF4Linear.from_linear(lin, compute_dtype=torch.bfloat16)
    b.reuse_buffer = True
    first = b.dequantize()
    assert b.dequantize().data_ptr() == first.data_ptr()
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("kernel", ["codec", "bitsandbytes"])
def test_layers_of_one_shape_share_scratch_without_mixing_weights(kernel, monkeypatch):
    # Two NF4 layers of the same shape (like q_proj and o_proj) chained: on the codec path their
    # matmuls share one dequantisation scratch; each output and input gradient must still use
    # its own weight (on bitsandbytes' path each call gets a fresh tensor).
    if kernel == "codec":
        monkeypatch.setattr(quant.backend, "serves", lambda q: False)
    l1, l2 = _linear(seed=1, inp=128, out=128), _linear(seed=2, inp=128, out=128)
    a, b = (NF4Linear.from_linear(m, compute_dtype=torch.float32) for m in (l1, l2))
    assert quant.backend.serves(a.quant) == (kernel == "bitsandbytes")
    # Hold both results while comparing: a freed tensor's address can be handed straight to the
    # next allocation, which would make two fresh tensors look shared.
    wa = a.dequantize_transient()
    wb = b.dequantize_transient()
    assert (wa.data_ptr() == wb.data_ptr()) == (kernel == "codec")
    del wa, wb
    w1, w2 = _bnb_weight(l1, torch.float32), _bnb_weight(l2, torch.float32)
    x = torch.randn(5, 128, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y = b(a(x))
    y_ref = F.linear(F.linear(x_ref, w1, l1.bias.detach()), w2, l2.bias.detach())
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_kernel_only_where_rows_hold_whole_blocks(dtype):
    # bitsandbytes' CPU kernel serves in_features % blocksize == 0 (every Qwen linear) and must
    # give the codec's exact values there; other widths take the codec (the kernel is wrong on
    # them: tests/quant/test_codec.py::test_bnb_cpu_dequant_bug_documented).
    for inp, out, blocksize, served in [(128, 96, 64, True), (512, 1536, 64, True), (256, 40, 128, True),
                                        (48, 64, 64, False), (192, 32, 128, False)]:
        lin = _linear(inp, out)
        layer = NF4Linear.from_linear(lin, blocksize=blocksize, compute_dtype=dtype)
        assert quant.backend.serves(layer.quant) == served, (inp, out, blocksize)
        codec = layer.quant.dequantize(dtype)
        assert torch.equal(layer.dequantize(), codec), (inp, out, blocksize)
        assert torch.equal(layer.dequantize_transient(), codec), (inp, out, blocksize)


def test_state_dict_keys_round_trip_and_bnb_readable():
    lin = _linear()
    layer = NF4Linear.from_linear(lin, compute_dtype=torch.float32)
    sd = layer.state_dict()
    assert set(sd) == {
        "weight", "bias", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
        "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4",
    }
    # bitsandbytes itself rebuilds the quant state from our tensors and dequantises to ours
    qs = bnbf.QuantState.from_dict({k: v for k, v in sd.items() if k not in ("weight", "bias")}, device="cpu")
    assert torch.equal(bnbf.dequantize_4bit(sd["weight"], qs).float(), layer.dequantize())
    fresh = NF4Linear.from_linear(_linear(seed=9), compute_dtype=torch.float32)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.dequantize(), layer.dequantize()) and torch.equal(fresh.bias, layer.bias)


def _packed_storages(layer):
    """Distinct storages among everything the layer holds (parameters, buffers, tensor attributes,
    the fields of its `quant`) that could be a copy of the packed codes (uint8, as many bytes)."""
    q = layer.quant
    held = list(layer.parameters()) + list(layer.buffers()) + [v for v in vars(layer).values() if torch.is_tensor(v)]
    held += [getattr(q, f.name) for f in dataclasses.fields(q) if torch.is_tensor(getattr(q, f.name))]
    return {t.untyped_storage().data_ptr() for t in held if t.dtype == torch.uint8 and t.numel() == layer.weight.numel()}


def test_packed_weight_is_stored_once_and_state_dict_round_trips_bit_exactly():
    """The 4-bit codes live in one storage (the `weight` Parameter; `quant` is a view over it), after
    construction, a dtype move, a replaced Parameter and a load; the state dict's bytes are
    bitsandbytes' own and load back bit for bit."""
    lin = _linear()
    layer = NF4Linear.from_linear(lin, compute_dtype=torch.float32)
    packed, _ = bnbf.quantize_4bit(lin.weight.detach(), quant_type="nf4", compress_statistics=True, blocksize=64)
    assert torch.equal(layer.weight, packed) and len(_packed_storages(layer)) == 1
    layer.to(torch.bfloat16)
    assert len(_packed_storages(layer)) == 1
    layer.weight.data = layer.weight.data.clone()   # whoever replaces the bytes, the NF4 view follows
    assert layer.quant.packed.data_ptr() == layer.weight.data_ptr() and len(_packed_storages(layer)) == 1
    sd = layer.state_dict()
    fresh = NF4Linear.from_linear(_linear(seed=9, bias=True), compute_dtype=torch.bfloat16)
    fresh.load_state_dict(sd)
    assert len(_packed_storages(fresh)) == 1 and fresh.quant.packed.data_ptr() == fresh.weight.data_ptr()
    again = fresh.state_dict()
    assert list(again) == list(sd)
    for key, tensor in sd.items():
        assert again[key].dtype == tensor.dtype and torch.equal(again[key], tensor), key
    assert torch.equal(fresh.dequantize(), layer.dequantize())


def test_to_dtype_keeps_statistics_and_moves_compute_dtype():
    layer = NF4Linear.from_linear(_linear(), compute_dtype=torch.float32)
    before = layer.dequantize()
    layer.to(torch.bfloat16)
    assert layer.compute_dtype == torch.bfloat16 and layer.weight.dtype == torch.uint8
    assert layer.quant.nested_absmax.dtype == torch.float32 and layer.quant.nested_code.dtype == torch.float32
    assert torch.equal(layer.dequantize(), before.to(torch.bfloat16))


def test_corrupt_quant_state_names_tensor():
    layer = NF4Linear.from_linear(_linear(), compute_dtype=torch.float32)
    sd = layer.state_dict()
    sd["weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(b"{not json"), dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="weight: corrupt 4-bit quant_state"):
        NF4Linear.from_linear(_linear(), compute_dtype=torch.float32).load_state_dict(sd)


def test_quantize_model_policy():
    model = nn.Sequential()
    model.add_module("a", nn.Linear(64, 64))
    model.add_module("act", nn.ReLU())
    model.add_module("lm_head", nn.Linear(64, 32))
    quant.quantize_model(model)
    assert isinstance(model.a, NF4Linear) and isinstance(model.lm_head, nn.Linear)
    with pytest.raises(ValueError, match="no nn.Linear"):
        quant.quantize_model(nn.Sequential(nn.ReLU()))


def test_lora_on_nf4_trains():
    lora = pytest.importorskip("lora")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    quant.quantize_model(model, skip=())
    lora.inject(model, r=4, alpha=8, targets=["0", "2"])
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(params, lr=1e-2)
    x, target = torch.randn(32, 64), torch.randn(32, 64)
    losses = []
    for _ in range(30):
        loss = F.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


def test_state_dict_without_double_quant_readable_by_bnb():
    lin = _linear(64, 80, seed=2)
    layer = NF4Linear.from_linear(lin, blocksize=128, double_quant=False, compute_dtype=torch.float32)
    sd = layer.state_dict()
    assert "weight.nested_absmax" not in sd and sd["weight.absmax"].dtype == torch.float32
    qs = bnbf.QuantState.from_dict({k: v for k, v in sd.items() if k not in ("weight", "bias")}, device="cpu")
    assert qs.blocksize == 128 and not qs.nested
    packed, ref_state = bnbf.quantize_4bit(lin.weight.detach(), blocksize=128, quant_type="nf4")
    assert torch.equal(sd["weight"], packed) and torch.equal(qs.absmax, ref_state.absmax)
    fresh = NF4Linear.from_linear(_linear(64, 80, seed=3), compute_dtype=torch.float32)
    fresh.load_state_dict(sd)
    assert fresh.blocksize == 128 and torch.equal(fresh.dequantize(), layer.dequantize())
