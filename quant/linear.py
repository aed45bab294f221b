"""`NF4Linear`: a frozen linear layer whose weight is stored as NF4 (bitsandbytes layout).

forward(x[..., in]) -> [..., out] = x @ dequantize(W).T + bias, in the compute dtype (the
model dtype, bf16 by default; never a silent fp32). Backward gives the input gradient only:
the dequantised weight is not saved for backward, it is rebuilt there from the 4-bit data.

state_dict keys are the ones bitsandbytes / transformers write for a 4-bit `Linear4bit`:
`weight` (uint8 [ceil(out*in/2), 1]), `weight.absmax`, `weight.quant_map`,
`weight.nested_absmax`, `weight.nested_quant_map` (double quantisation only),
`weight.quant_state.bitsandbytes__nf4` (JSON bytes) and `bias`.

Storage: the packed bytes exist once, as the module's `weight` Parameter. The statistics
(absmax, quant_map, nested_*) are plain tensor attributes that follow the weight's device, and
`quant` is an `NF4Tensor` built on each access from those tensors (no copy: its `packed` shares
the Parameter's storage), so nothing has to be re-synced after `.to()` or `load_state_dict`.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from models.qwen.cpu_fast_paths import scratch, upcast_matmul_dtype

from . import backend
from .nf4 import NF4Tensor, quantize
from .serialization import STAT_SUFFIXES, hf_quantization_config, nf4_from_state, nf4_to_state

# The slot of `scratch` (models.qwen.cpu_fast_paths) holding a dequantised NF4 weight, one per weight shape.
NF4_WEIGHT = "nf4 {shape}"


class _NF4MatMul(torch.autograd.Function):
    """y = x @ W.T with W = dequantize(q) in x's dtype; saves nothing big for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: "NF4Linear") -> torch.Tensor:  # type: ignore[override]
        ctx.module = module  # the 4-bit weight lives in the module; nothing dense is kept
        weight = module.dequantize_transient()
        mm = upcast_matmul_dtype(x, weight)
        if mm is None:
            return F.linear(x, weight)
        return F.linear(x.to(mm), weight.to(mm)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        weight = ctx.module.dequantize_transient()  # re-dequantised: no weight copy lived through forward
        mm = upcast_matmul_dtype(grad_out, weight)
        if mm is None:
            # Under autocast the forward ran in the autocast dtype; the backward of a custom
            # Function runs outside autocast, so cast the weight to the gradient's dtype.
            grad_x = grad_out @ weight.to(grad_out.dtype)
        else:
            grad_x = (grad_out.to(mm) @ weight.to(mm)).to(grad_out.dtype)
        return grad_x, None


class NF4Linear(nn.Module):
    """Frozen NF4 linear. Attributes: in_features, out_features, bias (frozen Parameter or None),
    compute_dtype, blocksize, double_quant, hf_quantization_config; `weight` is the packed
    uint8 Parameter (requires_grad=False), the one copy of the 4-bit codes, and `quant` the
    full `NF4Tensor` viewed over it (see the module docstring)."""

    def __init__(
        self,
        quantized: NF4Tensor,
        bias: Optional[torch.Tensor] = None,
        compute_dtype: Optional[torch.dtype] = None,
        reuse_buffer: bool = False,
    ) -> None:
        super().__init__()
        if len(quantized.shape) != 2:
            raise ValueError(f"NF4Linear: weight must be 2-D [out, in], got shape {tuple(quantized.shape)}")
        self.out_features, self.in_features = (int(s) for s in quantized.shape)
        self.compute_dtype = compute_dtype or quantized.dtype
        self._adopt(quantized)
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"NF4Linear: bias shape {tuple(bias.shape)}, expected ({self.out_features},)")
            self.bias = nn.Parameter(bias.detach().to(self.compute_dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        # Optional reused dequantisation buffer (saves an allocation per call).
        self.reuse_buffer = reuse_buffer
        self._buffer: Optional[torch.Tensor] = None

    def _adopt(self, q: NF4Tensor) -> None:
        """Take `q`'s tensors as this module's storage (no copy): `q.packed` becomes the `weight`
        Parameter, the statistics plain attributes, the rest metadata."""
        self.weight = nn.Parameter(q.packed, requires_grad=False)
        self._absmax, self._code = q.absmax, q.code
        self._nested_absmax, self._nested_code = q.nested_absmax, q.nested_code
        self._shape, self._dtype, self._blocksize = torch.Size(q.shape), q.dtype, q.blocksize
        self._nested_blocksize, self._offset = q.nested_blocksize, q.offset

    @property
    def quant(self) -> NF4Tensor:
        """The NF4Tensor of this layer, viewed over the module's own tensors (`packed` is `weight`'s storage)."""
        return NF4Tensor(
            packed=self.weight.data, absmax=self._absmax, shape=self._shape, dtype=self._dtype,
            blocksize=self._blocksize, code=self._code, nested_absmax=self._nested_absmax,
            nested_code=self._nested_code, nested_blocksize=self._nested_blocksize, offset=self._offset,
        )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: Optional[torch.dtype] = None,
    ) -> "NF4Linear":
        """Quantise an nn.Linear (weight [out, in], optional bias); compute dtype = its dtype by default."""
        weight = linear.weight.detach()
        q = quantize(weight, blocksize=blocksize, double_quant=double_quant)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(q, bias, compute_dtype=compute_dtype or weight.dtype)

    @property
    def blocksize(self) -> int:
        return self._blocksize

    @property
    def double_quant(self) -> bool:
        return self._nested_absmax is not None

    @property
    def hf_quantization_config(self) -> dict[str, Any]:
        """The `quantization_config` transformers expects in config.json for this layer's format."""
        return hf_quantization_config(self.compute_dtype, self.double_quant)

    # ------------------------------------------------------------------ compute
    def dequantize(self) -> torch.Tensor:
        """The weight [out, in] in the compute dtype (bitsandbytes' kernel when present, see backend.serves)."""
        out = None
        if self.reuse_buffer:
            buf = self._buffer
            if buf is None or buf.device != self.weight.device or buf.dtype != self.compute_dtype:
                buf = self._buffer = torch.empty(self._shape, dtype=self.compute_dtype, device=self.weight.device)
            out = buf
        return self._dequantize_into(out)

    def dequantize_transient(self) -> torch.Tensor:
        """Like `dequantize()`, but on the CPU codec path the result lives in a scratch tensor
        (`models.qwen.cpu_fast_paths.scratch`, one slot per weight shape) that every NF4Linear of the same
        shape shares: valid only until the next call. For the matmuls of `_NF4MatMul`, which
        use it at once and keep nothing (on CPU a fresh tensor per call costs page faults:
        47 -> 33 ms for the 56 weights of the 100M shape)."""
        if backend.serves(self.quant):
            return self._dequantize_into(None)  # bnb's kernel allocates; copying into a scratch would add a pass
        shape = tuple(self._shape)
        return self._dequantize_into(scratch(shape, self.compute_dtype, self.weight.device, NF4_WEIGHT.format(shape=shape)))

    def _dequantize_into(self, out: Optional[torch.Tensor]) -> torch.Tensor:
        """Dequantise into `out` (or a fresh tensor): bitsandbytes' kernel where it serves, else our codec."""
        q = self.quant
        fast = backend.dequantize(q, self.compute_dtype, out=out)
        if fast is not None:
            return fast
        return q.dequantize(self.compute_dtype, out=out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"NF4Linear: input has {x.shape[-1]} features, expected {self.in_features}")
        # The product runs in the compute dtype (the model dtype): inputs are cast to it.
        out = _NF4MatMul.apply(x.to(self.compute_dtype), self)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"blocksize={self.blocksize}, double_quant={self.double_quant}, compute_dtype={self.compute_dtype}"
        )

    # ------------------------------------------------------------------ device / dtype moves
    def _apply(self, fn, recurse: bool = True):
        # Statistics stay fp32/uint8 whatever `.to(dtype)` asks for; only the device follows.
        # A float `.to(dtype)` changes the compute dtype (it is the model dtype).
        probe = fn(torch.empty(0, dtype=self.compute_dtype, device=self.weight.device))
        super()._apply(fn, recurse)   # weight (uint8: device only) and bias
        device = self.weight.device
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        self._absmax, self._code = move(self._absmax), move(self._code)
        self._nested_absmax, self._nested_code = move(self._nested_absmax), move(self._nested_code)
        self.compute_dtype = probe.dtype
        self._buffer = None
        return self

    # ------------------------------------------------------------------ state dict (bnb keys)
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for suffix, tensor in nf4_to_state(self.quant).items():
            if suffix != "weight":
                destination[prefix + suffix] = tensor

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        stats = {s: state_dict[prefix + s] for s in ("weight",) + STAT_SUFFIXES if prefix + s in state_dict}
        if "weight" in stats:
            try:
                loaded = nf4_from_state(prefix + "weight", stats, device=self.weight.device)
            except ValueError as e:
                error_msgs.append(str(e))
                return
            if tuple(loaded.shape) != (self.out_features, self.in_features):
                error_msgs.append(
                    f"{prefix}weight: quant_state shape {tuple(loaded.shape)}, expected "
                    f"({self.out_features}, {self.in_features})"
                )
                return
            self._adopt(loaded)
        for s in STAT_SUFFIXES:
            state_dict.pop(prefix + s, None)  # consumed here, not unexpected
        local = dict(state_dict)
        local.pop(prefix + "weight", None)
        super()._load_from_state_dict(local, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if prefix + "weight" in missing_keys and "weight" in stats:
            missing_keys.remove(prefix + "weight")
