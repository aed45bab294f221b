"""LoRALinear against the explicit weight expressions (W + scale·B·A, and DoRA's
m ⊙ (W + scale·B·A) / ‖·‖_row), dtype behaviour, and its state-dict keys."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lora
from tests.helpers import DEVICES, assert_matches_formula, max_rel_err


def _layer(in_f=24, out_f=40, bias=True, seed=0, **kw):
    torch.manual_seed(seed)
    base = nn.Linear(in_f, out_f, bias=bias)
    layer = lora.LoRALinear(base, **kw)
    with torch.no_grad():
        layer.lora_B.weight.normal_()  # B starts at 0; give it a value so the update is visible
        if layer.use_dora:
            layer.lora_magnitude_vector.mul_(1 + 0.3 * torch.rand_like(layer.lora_magnitude_vector))
    return base, layer


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_lora_equals_explicit_weight(rslora, bias):
    base, layer = _layer(bias=bias, r=4, alpha=12, rslora=rslora)
    W, A, B = base.weight.detach(), layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    scale = 12 / (math.sqrt(4) if rslora else 4)
    x = torch.randn(3, 5, 24)
    b = base.bias if bias else torch.zeros(40)
    assert_matches_formula(layer(x), lambda x, W, A, B, b: x @ (W + scale * B @ A).T + b, x, W, A, B, b)


def test_dora_equals_paper_formula():
    base, layer = _layer(r=4, alpha=8, dora=True)
    W, A, B = base.weight.detach(), layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    m = layer.lora_magnitude_vector.detach()

    def w_dora(W, A, B, m):
        V = W + 2.0 * B @ A
        return m[:, None] * V / V.norm(dim=1, keepdim=True)

    x = torch.randn(7, 24)
    assert_matches_formula(layer(x), lambda x, *w: x @ w_dora(*w[:4]).T + w[4], x, W, A, B, m, base.bias)
    assert_matches_formula(layer.merged_weight(), w_dora, W, A, B, m)


def test_fresh_adapter_is_the_base():
    base, _ = _layer()
    layer = lora.LoRALinear(base, r=8, alpha=16, dora=True)
    x = torch.randn(4, 24)
    torch.testing.assert_close(layer(x), base(x), rtol=1e-6, atol=1e-6)
    assert torch.equal(layer.lora_B.weight, torch.zeros(40, 8))
    assert layer.lora_A.weight.abs().sum() > 0  # Kaiming-uniform A, not zero


def test_dropout_applies_to_adapter_input_only():
    base, layer = _layer(r=4, alpha=4, dropout=0.5)
    layer.train()
    x = torch.randn(64, 24)
    torch.manual_seed(3)
    y = layer(x)
    torch.manual_seed(3)
    x_d = nn.functional.dropout(x, 0.5, training=True)
    A, B = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    W, b = base.weight, base.bias

    def formula(x, x_d, W, b, A, B):
        return x @ W.T + b + x_d @ (B @ A).T

    assert_matches_formula(y, formula, x, x_d, W, b, A, B)
    layer.eval()
    assert_matches_formula(layer(x), formula, x, x, W, b, A, B)


class _RecordShapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self.shapes.append((str(func), tuple(out.shape)))
        return out


def test_forward_never_materialises_BA():
    # Shapes chosen so that no activation can be [out, in]: only a B·A product could.
    _, layer = _layer(in_f=24, out_f=40, r=4, alpha=4)
    x = torch.randn(3, 24)
    with _RecordShapes() as rec:
        y = layer(x)
        y.sum().backward()
    products = [s for f, s in rec.shapes if "mm" in f or "matmul" in f or "linear" in f]
    assert products, "no matrix products recorded: the check would be vacuous"
    assert (40, 24) not in products and (24, 40) not in products
    # Control: the same recorder does see a materialised B·A.
    with _RecordShapes() as rec:
        layer.delta_weight()
    assert (40, 24) in [s for f, s in rec.shapes if "mm" in f]


@pytest.mark.parametrize("model_dtype", [torch.bfloat16, torch.float16])
def test_low_precision_base_with_fp32_adapter(model_dtype):
    base, layer = _layer(r=4, alpha=8)
    ref_x = torch.randn(5, 24)
    ref = layer(ref_x)
    layer.base_layer.to(model_dtype)  # base in low precision, adapters stay fp32
    y = layer(ref_x.to(model_dtype))
    assert y.dtype == model_dtype
    # observed 3.7e-3 (bf16; 0.18 of the bound): the inputs' and output's IEEE rounding to the low
    # dtype, the same on every CPU (fp32 summation-order error, ~1e-7, is 1e-4 of it)
    assert max_rel_err(y.float(), ref) < 2e-2
    y.float().sum().backward()
    assert layer.lora_A.weight.grad is not None and layer.lora_A.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("dora", [False, True])
def test_bf16_autocast(dora):
    _, layer = _layer(r=4, alpha=8, dora=dora)
    x = torch.randn(5, 24)
    ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    # observed 6.0e-3 (0.2 of the bound): autocast's IEEE rounding of x, W and y to bf16, the same
    # on every CPU (fp32 summation-order error, ~1e-7, is 1e-4 of it)
    assert max_rel_err(y.float(), ref) < 3e-2
    y.float().sum().backward()
    assert layer.lora_B.weight.grad is not None and torch.isfinite(layer.lora_B.weight.grad).all()


def test_base_keys_unchanged_and_adapter_keys_extra():
    base, layer = _layer(r=4, dora=True)
    base_keys = set(nn.Linear(24, 40).state_dict())
    sd = layer.state_dict()
    assert set(sd) == base_keys | {"lora_A.weight", "lora_B.weight", "lora_magnitude_vector"}
    assert tuple(sd["lora_A.weight"].shape) == (4, 24) and tuple(sd["lora_B.weight"].shape) == (40, 4)
    assert tuple(sd["lora_magnitude_vector"].shape) == (40,)
    # round trip through load_state_dict (strict) into a fresh layer
    _, other = _layer(r=4, dora=True, seed=5)
    other.load_state_dict(sd)
    x = torch.randn(2, 24)
    assert torch.equal(other(x), layer(x))


def test_wrapping_twice_is_an_error():
    _, layer = _layer(r=4)
    with pytest.raises((ValueError, TypeError), match="LoRA|LoRALinear"):
        lora.LoRALinear(layer, r=4)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("device", DEVICES)
def test_bf16_base_fp32_adapter_is_pefts_function(device, dropout):
    # The fused update (one addmm, custom backward) against PEFT's own LoRA Linear on the same
    # weights: bf16 base, fp32 adapters, no autocast (PEFT's default adapter dtype).
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    outer = nn.Sequential(nn.Linear(48, 80)).to(device=device, dtype=torch.bfloat16)
    ref = peft.get_peft_model(
        outer, peft.LoraConfig(r=8, lora_alpha=24, lora_dropout=dropout, target_modules=["0"])
    )
    ref_layer = ref.base_model.model[0]
    with torch.no_grad():
        ref_layer.lora_B["default"].weight.normal_(0, 0.5)
    ours = lora.LoRALinear(nn.Linear(48, 80).to(device=device, dtype=torch.bfloat16), r=8, alpha=24, dropout=dropout)
    with torch.no_grad():
        ours.base_layer.weight.copy_(ref_layer.base_layer.weight)
        ours.base_layer.bias.copy_(ref_layer.base_layer.bias)
        ours.lora_A.weight.copy_(ref_layer.lora_A["default"].weight)
        ours.lora_B.weight.copy_(ref_layer.lora_B["default"].weight)
    assert ref_layer.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(2, 33, 48, dtype=torch.bfloat16).to(device)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(5)
    y_ref = ref_layer(x1)
    torch.manual_seed(5)
    y = ours(x2)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    # Same function: the fp32 update added to the upcast base output, rounded once.
    # observed 7.7e-8 (500x margin)
    assert max_rel_err(y.float(), y_ref.float()) < 1e-2 / 256
    g = torch.randn_like(y)
    y_ref.backward(g)
    y.backward(g)
    assert max_rel_err(x2.grad.float(), x1.grad.float()) < 1e-2
    # against PEFT's, fp32: observed 2.9e-7 and 3.7e-7 (27x margin at least)
    assert max_rel_err(ours.lora_A.weight.grad, ref_layer.lora_A["default"].weight.grad) < 1e-5
    assert max_rel_err(ours.lora_B.weight.grad, ref_layer.lora_B["default"].weight.grad) < 1e-5
    assert ours.base_layer.weight.grad is None


def test_adapters_reading_one_input_share_its_cast_correctly(monkeypatch):
    # q/k/v-style siblings read the same bf16 input: the fp32 cast is computed once and shared
    # (models.qwen.cpu_fast_paths.cast_shared), in forward and in backward. Each sibling's output and
    # every gradient must equal the same graph with a fresh cast per call, also when an adapter
    # of another input runs in between and when the input changes in place.
    import lora.fused_update as layer_module
    torch.manual_seed(0)
    layers = [lora.LoRALinear(nn.Linear(32, n).to(torch.bfloat16), r=4, alpha=8) for n in (32, 16, 16)]
    for layer in layers:
        with torch.no_grad():
            layer.lora_B.weight.normal_(0, 0.5)
    other = lora.LoRALinear(nn.Linear(32, 24).to(torch.bfloat16), r=4, alpha=8)
    with torch.no_grad():
        other.lora_B.weight.normal_(0, 0.5)
    x = torch.randn(3, 5, 32, dtype=torch.bfloat16)
    z = torch.randn(3, 5, 32, dtype=torch.bfloat16)

    def run(shared: bool):
        if not shared:
            monkeypatch.setattr(layer_module, "cast_shared", lambda t, dtype, slot: t.reshape(-1, t.shape[-1]).to(dtype))
        for m in layers + [other]:
            m.zero_grad(set_to_none=True)
        xs = x.clone().requires_grad_()
        outs = [layers[0](xs), other(z), layers[1](xs), layers[2](xs)]
        loss = sum((o.float() * (i + 1)).sum() for i, o in enumerate(outs))
        loss.backward()
        grads = [p.grad.clone() for m in layers + [other] for p in (m.lora_A.weight, m.lora_B.weight)]
        return [o.detach() for o in outs], xs.grad.clone(), grads

    outs_s, gx_s, grads_s = run(shared=True)
    outs_r, gx_r, grads_r = run(shared=False)
    monkeypatch.undo()
    for a, b in zip(outs_s, outs_r):
        assert torch.equal(a, b)
    assert torch.equal(gx_s, gx_r)
    for a, b in zip(grads_s, grads_r):
        assert torch.equal(a, b)
    with torch.no_grad():  # the same tensor, changed in place: the cached cast must not be reused
        x.mul_(3)
        changed = layers[0](x)
        expected = layers[0].base_layer(x).float() + layers[0].scale * (
            x.float() @ layers[0].lora_A.weight.t() @ layers[0].lora_B.weight.t())
    # observed 1.9e-3 (0.19): the bf16 rounding of the output, not a summation order (stale cast: ~1)
    assert max_rel_err(changed.float(), expected) < 1e-2
