"""The bitsandbytes / transformers on-disk format of a 4-bit NF4 weight.

For a module `m`, a "-bnb-4bit" checkpoint holds (suffixes relative to `m.`):
  weight                               uint8 [ceil(n/2), 1]   packed NF4 codes
  weight.absmax                        fp32 [nblocks] | uint8 [nblocks] (double quant)
  weight.quant_map                     fp32 [16]              the NF4 levels
  weight.nested_absmax                 fp32 [ceil(nblocks/256)]   (double quant only)
  weight.nested_quant_map              fp32 [256]                 (double quant only)
  weight.quant_state.bitsandbytes__nf4 uint8 [k]  UTF-8 JSON: quant_type, blocksize, dtype,
                                       shape, and nested_blocksize, nested_dtype, nested_offset
and config.json carries `quantization_config` (quant_method "bitsandbytes", load_in_4bit).
"""

from __future__ import annotations

import json
from typing import Any, Optional

import torch

from fileio.safe_load import loads_json

from .nf4 import NESTED_BLOCKSIZE, VALID_BLOCKSIZES, NF4Tensor

QUANT_STATE_KEY = "weight.quant_state.bitsandbytes__nf4"
NESTED_SUFFIXES = ("weight.nested_absmax", "weight.nested_quant_map")
STAT_SUFFIXES = ("weight.absmax", "weight.quant_map") + NESTED_SUFFIXES + (QUANT_STATE_KEY,)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def hf_quantization_config(compute_dtype: torch.dtype, double_quant: bool = True) -> dict[str, Any]:
    """config.json `quantization_config` of transformers' BitsAndBytesConfig(load_in_4bit, nf4)."""
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": bool(double_quant),
        "bnb_4bit_compute_dtype": _dtype_name(compute_dtype),
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": None,
        "llm_int8_threshold": 6.0,
    }


def pack_json(obj: dict[str, Any]) -> torch.Tensor:
    """A dict as a uint8 tensor of its UTF-8 JSON (bitsandbytes' `pack_dict_to_tensor`)."""
    return torch.tensor(list(json.dumps(obj).encode("utf-8")), dtype=torch.uint8)


def nf4_to_state(q: NF4Tensor) -> dict[str, torch.Tensor]:
    """suffix -> tensor, in bitsandbytes' key order (all on q's device)."""
    state = {"weight": q.packed, "weight.absmax": q.absmax, "weight.quant_map": q.code}
    meta: dict[str, Any] = {
        "quant_type": "nf4",
        "blocksize": q.blocksize,
        "dtype": _dtype_name(q.dtype),
        "shape": [int(s) for s in q.shape],
    }
    if q.double_quant:
        state["weight.nested_absmax"] = q.nested_absmax
        state["weight.nested_quant_map"] = q.nested_code.clone()  # not shared: safetensors refuses shared storage
        meta.update(nested_blocksize=q.nested_blocksize, nested_dtype="float32", nested_offset=q.offset)
    state[QUANT_STATE_KEY] = pack_json(meta).to(q.packed.device)
    return state


def _expect(name: str, cond: bool, what: str) -> None:
    if not cond:
        raise ValueError(f"{name}: corrupt 4-bit quant_state: {what}")


def nf4_from_state(name: str, tensors: dict[str, torch.Tensor], device: Optional[torch.device | str] = None) -> NF4Tensor:
    """Rebuild an NF4Tensor from bitsandbytes keys. `name` is the weight's full key (for errors).

    Every field is checked against the others (sizes, dtypes, blocksizes); anything that does
    not fit is a ValueError naming the tensor.
    """
    missing = [s for s in ("weight", "weight.absmax", "weight.quant_map", QUANT_STATE_KEY) if s not in tensors]
    if missing:
        raise ValueError(f"{name}: 4-bit weight is missing {', '.join(missing)} (expected the bitsandbytes nf4 quant_state)")
    raw = tensors[QUANT_STATE_KEY]
    _expect(name, raw.dtype == torch.uint8 and raw.dim() == 1, f"{QUANT_STATE_KEY} must be a 1-D uint8 tensor")
    try:
        meta = loads_json(bytes(raw.cpu().tolist()))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{name}: corrupt 4-bit quant_state: {QUANT_STATE_KEY} is not JSON ({e})") from None
    _expect(name, isinstance(meta, dict), "quant_state JSON is not an object")
    _expect(name, meta.get("quant_type") == "nf4", f"quant_type {meta.get('quant_type')!r}, expected 'nf4'")
    blocksize = meta.get("blocksize")
    _expect(name, blocksize in VALID_BLOCKSIZES, f"blocksize {blocksize!r}, expected one of {VALID_BLOCKSIZES}")
    _expect(name, meta.get("dtype") in _DTYPES, f"dtype {meta.get('dtype')!r}, expected one of {sorted(_DTYPES)}")
    shape = meta.get("shape")
    _expect(name, isinstance(shape, list) and all(isinstance(s, int) and s > 0 for s in shape), f"shape {shape!r}")
    n = 1
    for s in shape:
        n *= s
    nblocks = -(-n // blocksize)

    packed = tensors["weight"]
    _expect(name, packed.dtype == torch.uint8, f"weight dtype {packed.dtype}, expected uint8")
    _expect(name, packed.numel() == -(-n // 2), f"weight holds {packed.numel()} bytes, shape {shape} needs {-(-n // 2)}")
    code = tensors["weight.quant_map"]
    _expect(name, code.dtype == torch.float32 and code.numel() == 16, "quant_map must be 16 float32 levels")
    absmax = tensors["weight.absmax"]
    _expect(name, absmax.numel() == nblocks, f"absmax has {absmax.numel()} values, expected {nblocks}")

    nested = "nested_absmax" in meta or "nested_offset" in meta or any(s in tensors for s in NESTED_SUFFIXES)
    q = NF4Tensor(
        packed=packed.reshape(-1, 1).to(device),
        absmax=absmax.to(device),
        shape=torch.Size(shape),
        dtype=_DTYPES[meta["dtype"]],
        blocksize=blocksize,
        code=code.to(device),
    )
    if nested:
        for s in NESTED_SUFFIXES:
            _expect(name, s in tensors, f"double-quantised but {s} is missing")
        nested_bs = meta.get("nested_blocksize", NESTED_BLOCKSIZE)
        _expect(name, nested_bs in VALID_BLOCKSIZES + (NESTED_BLOCKSIZE,), f"nested_blocksize {nested_bs!r}")
        offset = meta.get("nested_offset")
        _expect(name, isinstance(offset, (int, float)), f"nested_offset {offset!r}, expected a number")
        _expect(name, absmax.dtype == torch.uint8, f"absmax dtype {absmax.dtype}, expected uint8 (double quantised)")
        nabs = tensors["weight.nested_absmax"]
        ncode = tensors["weight.nested_quant_map"]
        _expect(name, nabs.dtype == torch.float32 and nabs.numel() == -(-nblocks // nested_bs),
                f"nested_absmax has {nabs.numel()} {nabs.dtype} values, expected {-(-nblocks // nested_bs)} float32")
        _expect(name, ncode.dtype == torch.float32 and ncode.numel() == 256, "nested_quant_map must be 256 float32 values")
        q.nested_absmax = nabs.to(device)
        q.nested_code = ncode.to(device)
        q.nested_blocksize = int(nested_bs)
        q.offset = float(offset)
    else:
        _expect(name, absmax.dtype == torch.float32, f"absmax dtype {absmax.dtype}, expected float32")
    return q
