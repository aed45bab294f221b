"""quant.nf4 against bitsandbytes' own kernels (CPU, and CUDA where there is a GPU): bytes of
`packed` and of every statistic, and dequantised values, must be identical."""

from __future__ import annotations

import pytest
import torch

from quant import nf4
from tests.helpers import DEVICES

bnbf = pytest.importorskip("bitsandbytes.functional")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (37, 29): odd count and rows straddling blocks; (300, 70): >256 blocks, so the nested absmax
# has a short last block; (5,): one short block; (7, 7, 9): 3-D.
SHAPES = [(64, 128), (37, 29), (300, 70), (5,), (7, 7, 9), (33, 256)]


def _weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    w.view(-1)[: min(130, w.numel() // 3)] = 0  # an all-zero block (absmax 0) where it fits
    w.view(-1)[-1] = 0.3  # an outlier in the last block
    return w.to(dtype)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_bytes_identical_to_bitsandbytes(device, dtype, blocksize, double_quant):
    # On CUDA both sides run there: our codec in torch ops, bitsandbytes its CUDA kernels (which
    # round and search the 8-bit code their own way, not through the CPU kernel's table).
    for shape in SHAPES:
        w = _weight(shape, dtype).to(device)
        packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
        q = nf4.quantize(w, blocksize=blocksize, double_quant=double_quant)
        assert q.packed.dtype == torch.uint8 and torch.equal(q.packed, packed), shape
        assert torch.equal(q.absmax, state.absmax), shape
        assert torch.equal(q.code, state.code)
        assert q.shape == state.shape and q.dtype == state.dtype == dtype
        if double_quant:
            assert torch.equal(q.nested_absmax, state.state2.absmax), shape
            assert torch.equal(q.nested_code, state.state2.code)
            assert q.offset == state.offset.item()
            assert q.nested_blocksize == state.state2.blocksize == 256
        else:
            assert state.state2 is None and q.nested_absmax is None
        # dequantise: equal values, original dtype
        ref = bnbf.dequantize_4bit(packed, state, quant_type="nf4")
        out = q.dequantize()
        assert out.dtype == dtype and torch.equal(out, ref), shape


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_into_buffer_and_other_dtype(dtype):
    w = _weight((64, 128), torch.float32)
    packed, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    q = nf4.quantize(w)
    buf = torch.empty(64, 128, dtype=dtype)
    state.dtype = dtype  # bitsandbytes computes level * absmax in fp32 and rounds once to dtype
    ref = bnbf.dequantize_4bit(packed, state, quant_type="nf4")
    assert q.dequantize(dtype, out=buf) is buf
    assert torch.equal(buf, ref)


def test_bnb_cpu_dequant_bug_documented():
    """bitsandbytes' native CPU dequantize_4bit indexes absmax per row, which is wrong when the
    row length is not a multiple of the block size (here 48 < 64). Our output matches its
    generic PyTorch kernel and is within NF4 error of the weight. bitsandbytes dispatches to the
    native kernel on any CPU where its native library loads (measured beyond the NF4 bound with
    torch's AVX512 and, under ATEN_CPU_CAPABILITY=avx2, AVX2 kernels), else to the generic one,
    which equals ours. Rows of whole blocks (the `aligned` fixture the bitsandbytes references
    use) equal ours either way."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib

    w = _weight((64, 48), torch.float32)
    packed, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=False)
    q = nf4.quantize(w, double_quant=False)
    generic_kernel = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)  # skip torch.compile
    generic = generic_kernel(packed.reshape(-1), state.absmax, state.code, 64, (64, 48), torch.float32)
    assert torch.equal(q.dequantize(), generic)
    # Half the widest NF4 gap (-1 .. -0.6962) times the block absmax is the most a level can be off.
    bound = 0.152 * w.abs().max()
    assert (q.dequantize() - w).abs().max() <= bound
    dispatched = bnbf.dequantize_4bit(packed, state, quant_type="nf4")
    if not isinstance(lib, ErrorHandlerMockBNBNativeLibrary):
        assert (dispatched - w).abs().max() > bound
    else:
        assert torch.equal(dispatched, q.dequantize())
    whole = _weight((48, 128), torch.float32)
    packed, state = bnbf.quantize_4bit(whole, quant_type="nf4", compress_statistics=False)
    assert torch.equal(bnbf.dequantize_4bit(packed, state, quant_type="nf4"),
                       nf4.quantize(whole, double_quant=False).dequantize())


def test_nested_8bit_matches_bnb_blockwise():
    """The 8-bit dynamic-map stage alone, on values spanning 1e-7 .. 1 and exact ±1 / 0."""
    g = torch.Generator().manual_seed(1)
    v = torch.randn(256 * 9 + 77, generator=g) * torch.logspace(-7, 0, 256 * 9 + 77)
    v[:256] = 0
    v[300], v[301], v[302] = 1.0, -1.0, 0.0
    codes, absmax = nf4.quantize_blockwise_8bit(v, 256)
    ref_codes, ref_state = bnbf.quantize_blockwise(v, blocksize=256)
    assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_state.absmax)
    back = nf4.dequantize_blockwise_8bit(codes, absmax, nf4.dynamic_map(), 256)
    assert torch.equal(back, bnbf.dequantize_blockwise(ref_codes, ref_state))


def test_codebooks_match_bitsandbytes():
    assert torch.equal(nf4.nf4_code(), bnbf.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(nf4.dynamic_map(), bnbf.create_dynamic_map())


def test_packing_order_high_nibble_first():
    w = torch.tensor([-1.0, 1.0, 0.0])  # indices 0, 15, 7 (+ pad 0 -> index 7)
    q = nf4.quantize(w, double_quant=False)
    assert q.packed.flatten().tolist() == [0x0F, 0x77]


def test_quantisation_error_bound():
    w = _weight((128, 256), torch.float32, seed=5)
    q = nf4.quantize(w)
    err = (q.dequantize() - w).abs().view(-1, 64).amax(1)
    scale = w.abs().view(-1, 64).amax(1)
    # half the widest NF4 gap (-1 .. -0.6962) times the true scale, plus the error the 8-bit
    # double quantisation made in the scale itself (|level| <= 1)
    scale_err = (q.float_absmax() - scale).abs()
    assert (scale_err <= 0.01 * scale.max()).all()
    assert (err <= 0.1520 * scale + scale_err + 1e-7).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(weight=torch.zeros(4, 4, dtype=torch.int32)), "dtype"),
        (dict(weight=torch.zeros(4, 4), blocksize=48), "blocksize"),
        (dict(weight=torch.tensor([1.0, float("nan")])), "NaN"),
        (dict(weight=torch.zeros(0)), "empty"),
    ],
)
def test_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        nf4.quantize(**kwargs)


def test_nbytes_counts_everything():
    q = nf4.quantize(torch.randn(128, 64))
    # 8192 codes / 2 + 128 uint8 absmax + 16*4 + 1*4 nested absmax + 256*4 nested map
    assert q.nbytes() == 8192 // 2 + 128 + 64 + 4 + 1024
