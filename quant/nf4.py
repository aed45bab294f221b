"""NF4 codec in plain PyTorch, byte-compatible with bitsandbytes' `quantize_4bit(quant_type="nf4")`.

Layout (as bitsandbytes): the weight is flattened row-major, cut into blocks of `blocksize`
values (the last block may be short), each block is scaled by its absmax into [-1, 1] and
every value is replaced by the index of the nearest of the 16 NF4 levels. Two 4-bit indices
share a byte, the first value in the high nibble; an odd count is padded with one zero index.
`packed` has shape [ceil(n/2), 1], uint8, exactly as bitsandbytes' Params4bit stores it.

Double quantisation (`compress_statistics=True` in bitsandbytes): the fp32 absmax vector minus
its mean (`offset`) is quantised again in blocks of 256 with the signed 8-bit dynamic map.
bitsandbytes' CPU kernel finds the 8-bit code through a 65536-entry lookup table over a
uniform grid of [-1, 1]; `quantize_blockwise_8bit` reproduces that table so that the nested
statistics are byte-identical too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

# The 16 NormalFloat4 levels (QLoRA paper, appendix E; bitsandbytes `get_4bit_type("nf4")`):
# quantiles of N(0, 1) normalised to [-1, 1], with an exact 0. Index = position in this list.
NF4_LEVELS = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256  # bitsandbytes quantises the absmax vector in blocks of 256
_CHUNK = 1 << 20  # values quantised per step (a multiple of every valid blocksize)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def nf4_code(device: torch.device | str | None = None) -> torch.Tensor:
    """The NF4 codebook, float32 [16]."""
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic (exponent + fraction) map, float32 [256], sorted.

    For each exponent e = 0..6 the fraction interval [0.1, 1] is split into 2^e (signed)
    bins whose midpoints, scaled by 10^(e-6), are the codes; plus 0 and 1.
    """
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        bounds = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2**total_bits - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


# ---------------------------------------------------------------------- blockwise helpers
def _blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """[n] -> [ceil(n/blocksize), blocksize], zero-padded (zeros never change an absmax)."""
    n = flat.numel()
    nblocks = -(-n // blocksize)
    return torch.nn.functional.pad(flat, (0, nblocks * blocksize - n)).view(nblocks, blocksize)


def _scaled(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 values / block absmax, clamped to [-1, 1] -> ([nblocks, blocksize], absmax [nblocks])."""
    n = flat.numel()
    blocks = _blocks(flat.float(), blocksize)
    absmax = blocks.abs().amax(dim=1)
    # Full blocks are multiplied by the reciprocal of their absmax and a short last block is
    # divided by it: exactly bitsandbytes' rounding (the two differ in the last bit).
    safe = absmax.clamp(min=1e-38).unsqueeze(1)
    scaled = blocks * (1.0 / safe)
    if n % blocksize:
        scaled[-1] = blocks[-1] / safe[-1]
    return torch.clamp(scaled, -1, 1), absmax


_LUT_CACHE: dict[str, torch.Tensor] = {}


def _dynamic_lut() -> torch.Tensor:
    """uint8 [65536]: nearest dynamic-map index for each point g = i/32767.5 - 1 of a uniform grid.

    This is the table behind bitsandbytes' CPU `quantize_blockwise` (nearest code, ties to the
    lower index); a value z in [-1, 1] is looked up at trunc((z + 1) * 32767.5 + 0.5).
    """
    if "dynamic" not in _LUT_CACHE:
        code = dynamic_map().double()
        grid = torch.arange(65536, dtype=torch.float64) / 32767.5 - 1
        right = torch.searchsorted(code, grid).clamp(1, 255)
        left = right - 1
        nearest = torch.where((code[right] - grid).abs() < (grid - code[left]).abs(), right, left)
        _LUT_CACHE["dynamic"] = nearest.to(torch.uint8)
    return _LUT_CACHE["dynamic"]


def quantize_blockwise_8bit(values: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit dynamic-map blockwise quantisation of a 1-D fp32 tensor (bitsandbytes CPU bytes).

    Returns (codes uint8 [n], absmax fp32 [ceil(n/blocksize)]). An all-zero block gets codes 0.
    """
    n = values.numel()
    scaled, absmax = _scaled(values.reshape(-1), blocksize)
    grid_index = torch.trunc((scaled + 1) * 32767.5 + 0.5).long().clamp(0, 65535)
    codes = _dynamic_lut().to(values.device)[grid_index]
    codes = codes.masked_fill((absmax == 0).unsqueeze(1), 0)
    return codes.reshape(-1)[:n], absmax


def dequantize_blockwise_8bit(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    """fp32 [n] = code[codes] * absmax of its block."""
    n = codes.numel()
    values = code.to(codes.device)[codes.reshape(-1).long()]
    return (_blocks(values, blocksize) * absmax.unsqueeze(1)).reshape(-1)[:n]


# ---------------------------------------------------------------------- NF4
@dataclass
class NF4Tensor:
    """A weight quantised to NF4.

    packed: uint8 [ceil(n/2), 1] (bitsandbytes layout). absmax: fp32 [nblocks], or uint8
    [nblocks] when double-quantised, with nested_absmax fp32 [ceil(nblocks/256)],
    nested_code fp32 [256] and offset (python float, the mean of the fp32 absmax).
    shape / dtype: of the original weight (dequantize() returns that dtype by default).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    code: Optional[torch.Tensor] = None
    nested_absmax: Optional[torch.Tensor] = None
    nested_code: Optional[torch.Tensor] = None
    nested_blocksize: int = NESTED_BLOCKSIZE
    offset: Optional[float] = None

    def __post_init__(self) -> None:
        if self.code is None:
            self.code = nf4_code(self.packed.device)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n

    def float_absmax(self) -> torch.Tensor:
        """The per-block fp32 scales (undoing double quantisation exactly as bitsandbytes)."""
        if not self.double_quant:
            return self.absmax.float()
        scales = dequantize_blockwise_8bit(self.absmax, self.nested_absmax, self.nested_code, self.nested_blocksize)
        return scales + torch.tensor(self.offset, dtype=torch.float32)

    def dequantize(self, dtype: Optional[torch.dtype] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The weight, shape `self.shape`, in `dtype` (default: the original dtype).

        Computed in fp32 (level * block absmax) and rounded once, as bitsandbytes does.
        `out` (same shape and dtype) is written in place and returned: a reused buffer.
        """
        dtype = dtype or self.dtype
        return dequantize_nf4(self.packed, self.float_absmax(), self.blocksize, self.shape, dtype, self.code, out=out)

    def to(self, device: torch.device | str) -> "NF4Tensor":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return NF4Tensor(
            move(self.packed), move(self.absmax), self.shape, self.dtype, self.blocksize, move(self.code),
            move(self.nested_absmax), move(self.nested_code), self.nested_blocksize, self.offset,
        )

    def nbytes(self) -> int:
        """Storage of the quantised weight and all its statistics, in bytes."""
        tensors = [self.packed, self.absmax, self.code, self.nested_absmax, self.nested_code]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def quantize(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Tensor:
    """Quantise a float tensor of any shape to NF4 (bitsandbytes-identical bytes).

    weight: fp32 / fp16 / bf16, any shape; its numel need not be a multiple of `blocksize`
    (the last block is short, as in bitsandbytes). blocksize: one of 32, 64, ..., 4096.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"quantize: expected a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in FLOAT_DTYPES:
        raise ValueError(f"quantize: weight dtype {weight.dtype} not supported (expected float32, float16 or bfloat16)")
    if blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"quantize: blocksize={blocksize} invalid (expected one of {VALID_BLOCKSIZES})")
    if weight.numel() == 0:
        raise ValueError("quantize: weight is empty")

    n = weight.numel()
    flat = weight.detach().reshape(-1)
    code = nf4_code(weight.device)
    bounds = (code[:-1] + code[1:]) / 2
    # Work in chunks of whole blocks: the fp32 temporaries stay small (peak memory while
    # streaming a checkpoint) and cache-resident. A chunk size that is a multiple of every
    # valid blocksize and even keeps blocks and byte pairs aligned.
    chunk = max(_CHUNK, blocksize)
    packed = torch.empty(-(-n // 2), dtype=torch.uint8, device=weight.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=weight.device)
    for start in range(0, n, chunk):
        part = flat[start : start + chunk]
        scaled, part_absmax = _scaled(part, blocksize)
        absmax[start // blocksize : start // blocksize + part_absmax.numel()] = part_absmax
        values = scaled.reshape(-1)[: part.numel()]
        if values.numel() % 2:
            # An odd count is padded with the value 0 (NF4 index 7), as bitsandbytes pads.
            values = torch.nn.functional.pad(values, (0, 1))
        # Nearest level, ties to the lower one: bucketize against the midpoints (right=False).
        indices = torch.bucketize(values, bounds, out_int32=True).to(torch.uint8)
        packed[start // 2 : start // 2 + values.numel() // 2] = (indices[0::2] << 4) | indices[1::2]
    if not torch.isfinite(absmax).all():  # a NaN or Inf anywhere makes its block's absmax non-finite
        raise ValueError("quantize: weight contains NaN or Inf")
    packed = packed.unsqueeze(1)

    q = NF4Tensor(packed=packed, absmax=absmax, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize, code=code)
    if double_quant:
        offset = absmax.mean()
        nested_codes, nested_absmax = quantize_blockwise_8bit(absmax - offset, NESTED_BLOCKSIZE)
        q.absmax = nested_codes
        q.nested_absmax = nested_absmax
        q.nested_code = dynamic_map().to(weight.device)
        q.offset = float(offset.item())
    return q


# Packed bytes dequantised per slice on CPU: 2 x 32768 values, a multiple of every blocksize.
_DEQUANT_BYTES = 32768


def dequantize_nf4(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    shape: torch.Size,
    dtype: torch.dtype,
    code: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """packed uint8 [ceil(n/2), 1] + fp32 absmax [nblocks] -> tensor `shape` in `dtype`."""
    n = 1
    for s in shape:
        n *= int(s)
    flat = packed.reshape(-1)
    if flat.numel() != -(-n // 2):
        raise ValueError(f"dequantize: packed holds {flat.numel()} bytes, expected {-(-n // 2)} for shape {tuple(shape)}")
    code = nf4_code(packed.device) if code is None else code.to(packed.device)
    if out is not None and (tuple(out.shape) != tuple(shape) or out.dtype != dtype):
        raise ValueError(f"dequantize: out is {tuple(out.shape)} {out.dtype}, expected {tuple(shape)} {dtype}")
    if n % blocksize == 0 and (out is None or out.is_contiguous()):  # every real linear: the fast path
        # One lookup per byte: a 256-entry table of (high, low) level pairs, read as 8-byte
        # words so the gather moves one element per byte (2.5x faster than unpacking the
        # nibbles and gathering each; same values).
        byte = torch.arange(256, device=packed.device)
        pairs = torch.stack([code[byte >> 4], code[byte & 0x0F]], dim=1).float().contiguous().view(torch.int64)
        result = out if out is not None else torch.empty(shape, dtype=dtype, device=packed.device)
        values = result.view(-1)
        scales = absmax.float()
        # On CPU in slices of _DEQUANT_BYTES packed bytes, so the int64 indices and fp32 levels
        # stay a few hundred KB instead of 8 bytes per weight (544 MB for one 7B MLP matrix).
        step = _DEQUANT_BYTES if packed.device.type == "cpu" else flat.numel()
        for start in range(0, flat.numel(), step):
            part = flat[start : start + step]
            levels = torch.take(pairs.reshape(256), part.long()).view(torch.float32)
            first = 2 * start // blocksize
            # level * fp32 absmax, rounded once into the output dtype
            torch.mul(levels.view(-1, blocksize), scales[first : first + levels.numel() // blocksize].unsqueeze(1),
                      out=values[2 * start : 2 * start + levels.numel()].view(-1, blocksize))
        return result
    idx = torch.stack([flat >> 4, flat & 0x0F], dim=1).reshape(-1)[:n].long()
    values = _blocks(code[idx], blocksize) * absmax.float().unsqueeze(1)
    values = values.reshape(-1)[:n].view(shape)
    if out is not None:
        return out.copy_(values)
    return values.to(dtype)
