"""The CPU bf16 fast path computes the same function as a native bf16 GEMM."""

import torch
import torch.nn.functional as F

from models.qwen.cpu_fast_paths import _UpcastLinear
from models.qwen.linear import Linear


def test_upcast_linear_equals_bf16_gemm_within_one_rounding():
    torch.manual_seed(0)
    x = torch.randn(4, 7, 64, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(48, 64, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(48, dtype=torch.bfloat16, requires_grad=True)
    got = _UpcastLinear.apply(x, w, b)
    exact = F.linear(x.double(), w.double(), b.double())  # the true product of the bf16 inputs
    native = F.linear(x, w, b)  # oneDNN's bf16 GEMM (fp32 accumulate, one rounding)
    assert got.dtype == torch.bfloat16
    # one bf16 rounding of the exact result: relative error <= 2^-8
    assert ((got.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-6).all()
    assert ((native.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-6).all()
    g = torch.randn_like(got)
    gx, gw, gb = torch.autograd.grad(got, (x, w, b), g)
    rx, rw, rb = torch.autograd.grad(F.linear(x.double(), w.double(), b.double()), (x, w, b), g.double())
    for a, r in ((gx, rx), (gw, rw), (gb, rb)):
        assert a.dtype == torch.bfloat16
        assert ((a.double() - r.double()).abs() <= r.double().abs() * 2**-7 + 1e-2).all()


def test_linear_is_a_plain_linear_in_fp32():
    torch.manual_seed(1)
    lin = Linear(16, 8)
    x = torch.randn(3, 16)
    assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
    assert isinstance(lin, torch.nn.Linear)


def test_autocast_bf16_on_cpu_gives_bf16_output():
    lin = Linear(16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lin(torch.randn(2, 16))
    assert out.dtype == torch.bfloat16
