"""`LoRALinear`: a frozen base linear plus a low-rank update, optionally DoRA.

    y = base(x) + scale · B(A(dropout(x)))            scale = alpha / r   (rsLoRA: alpha / √r)

A: [r, in] (Kaiming-uniform), B: [out, r] (zeros), so a fresh adapter changes nothing. The
update is computed as (x·Aᵀ)·Bᵀ: B·A is never materialised in the forward pass.

DoRA (Liu et al. 2024, https://arxiv.org/abs/2402.09353) re-parameterises the adapted weight
as magnitude · direction:  W' = m ⊙ (W + scale·B·A) / ‖W + scale·B·A‖_row, with the row norm
treated as a constant (detached) as in section 4.3 of the paper and in PEFT.

The base module is held as the child `base_layer`, but state-dict keys are flattened so the
base keeps its checkpoint names (`q_proj.weight`, `q_proj.bias`, and for an NF4 base its
bitsandbytes keys `q_proj.weight.absmax`, ...); adapter keys are extra:
`q_proj.lora_A.weight` [r, in], `q_proj.lora_B.weight` [out, r] and, for DoRA,
`q_proj.lora_magnitude_vector` [out] (PEFT's key).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from quant import NF4Linear

from .fused_update import lora_update


def is_nf4_linear(module: nn.Module) -> bool:
    """Whether `module` is a 4-bit `quant.NF4Linear` (a QLoRA base)."""
    return isinstance(module, NF4Linear)


def is_linear(module: nn.Module) -> bool:
    """A module LoRA can wrap: `nn.Linear` or a 4-bit `quant.NF4Linear`."""
    return isinstance(module, nn.Linear) or is_nf4_linear(module)


def base_weight(module: nn.Module) -> torch.Tensor:
    """The dense weight [out, in] of a plain or NF4 linear (NF4: dequantised, compute dtype)."""
    if isinstance(module, nn.Linear):
        return module.weight
    return module.dequantize()


def module_device(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


class FlattenedBase(nn.Module):
    """Mixin: the child named `_flattened_child` keeps its state-dict keys at our own prefix.

    `state_dict()` writes `prefix + key` instead of `prefix + child + "." + key`, and
    `load_state_dict()` maps them back, so wrapping a module leaves its checkpoint keys as
    they were.
    """

    _flattened_child = "base_layer"

    def _init_flattening(self) -> None:
        self.register_state_dict_post_hook(FlattenedBase._flatten_keys)
        self.register_load_state_dict_pre_hook(FlattenedBase._unflatten_keys)

    @staticmethod
    def _flatten_keys(module, state_dict, prefix, local_metadata) -> None:
        inner = prefix + module._flattened_child + "."
        # Pop and re-insert every key under our prefix so the overall order stays stable.
        for key in [k for k in state_dict if k.startswith(prefix)]:
            value = state_dict.pop(key)
            new_key = prefix + key[len(inner):] if key.startswith(inner) else key
            state_dict[new_key] = value

    @staticmethod
    def _unflatten_keys(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
        own = module._own_state_names()
        for key in [k for k in state_dict if k.startswith(prefix)]:
            rest = key[len(prefix):]
            if rest.split(".", 1)[0] in own:
                continue
            state_dict[prefix + module._flattened_child + "." + rest] = state_dict.pop(key)

    def _own_state_names(self) -> set[str]:
        """First key components that belong to the wrapper itself, not to the flattened child."""
        names = {n for n in self._modules if n != self._flattened_child}
        return names | set(self._parameters) | set(self._buffers)


class LoRALinear(FlattenedBase):
    """Frozen base linear + trainable low-rank update. x [..., in] -> [..., out].

    base: `nn.Linear` or `quant.NF4Linear` (both have in_features, out_features, bias and
    forward; base_weight() gives either one's dense weight). Adapter parameters are created on the base's device
    in `dtype` (default float32: the trainable weights stay fp32 under bf16 autocast).
    """

    def __init__(
        self,
        base: nn.Module,
        r: int = 16,
        alpha: float = 16,
        dropout: float = 0.0,
        rslora: bool = False,
        dora: bool = False,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        if not is_linear(base):
            raise TypeError(f"LoRALinear wraps nn.Linear or quant.NF4Linear, got {type(base).__name__}")
        if isinstance(base, LoRALinear):
            raise ValueError("this linear already holds a LoRA adapter")
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoRA rank r must be a positive int, got {r!r}")
        if not (0.0 <= float(dropout) < 1.0):
            raise ValueError(f"lora dropout must be in [0, 1), got {dropout!r}")
        self.in_features = int(base.in_features)
        self.out_features = int(base.out_features)
        self.r, self.alpha, self.rslora, self.use_dora = r, float(alpha), bool(rslora), bool(dora)
        self.scale = self.alpha / (math.sqrt(r) if rslora else r)
        self.adapters_enabled = True

        for p in base.parameters():
            p.requires_grad_(False)
        self.base_layer = base
        device = module_device(base)
        dtype = dtype or torch.float32
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self.reset_adapter()
        if dora:
            # m starts at ‖W‖_row so the DoRA layer also starts equal to the base.
            self.lora_magnitude_vector = nn.Parameter(self.weight_norm().to(dtype))
        else:
            self.register_parameter("lora_magnitude_vector", None)
        self._init_flattening()

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """A ~ Kaiming-uniform (as nn.Linear and PEFT), B = 0: the adapter starts as a no-op."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    # ------------------------------------------------------------------ weights
    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    def delta_weight(self) -> torch.Tensor:
        """scale · B·A in float32, [out, in]. For merge and DoRA's row norm (which needs the full
        adapted weight, under no_grad, as in PEFT); the plain LoRA forward never builds it."""
        return self.scale * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def _full_weight_fp32(self) -> torch.Tensor:
        """W + scale·B·A in float32 [out, in], autocast off (it would round the product)."""
        with torch.autocast(self.lora_A.weight.device.type, enabled=False):
            return base_weight(self.base_layer).float() + self.delta_weight()

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """‖W + scale·B·A‖ per output row, float32 [out]; a constant for autograd (DoRA §4.3)."""
        return torch.linalg.vector_norm(self._full_weight_fp32(), dim=1)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + scale·B·A (DoRA: m ⊙ (W + scale·B·A) / ‖·‖_row) in float32, [out, in]."""
        w = self._full_weight_fp32()
        if self.use_dora:
            norm = torch.linalg.vector_norm(w, dim=1, keepdim=True)
            w = w * (self.lora_magnitude_vector.float().unsqueeze(1) / norm)
        return w

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = base(x) + scale · B(A(dropout(x)))   (DoRA: `_dora_forward`)."""
        out = self.base_layer(x)
        if not self.adapters_enabled:
            return out
        if self.use_dora:
            x_d = self.lora_dropout(x)
            x_a = x_d if torch.is_autocast_enabled(x.device.type) else x_d.to(self.lora_A.weight.dtype)
            return self._dora_forward(x, x_d, out, self.lora_B(self.lora_A(x_a)))
        return lora_update(out, x, self.lora_A.weight, self.lora_B.weight, self.scale, self.lora_dropout)

    def _dora_forward(self, x, x_d, out, lora):
        """out + (g - 1)·W·x_d + g·scale·B·A·x_d with g = m / ‖W + scale·B·A‖ (PEFT's form).

        Without dropout this is exactly bias + g ⊙ (W + scale·B·A)·x.
        """
        g = self.lora_magnitude_vector / self.weight_norm().to(self.lora_magnitude_vector.dtype)
        bias = self.base_layer.bias
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            # No dropout: reuse the base output instead of a second matmul.
            wx = out if bias is None else out - bias.to(out.dtype)
        else:
            wx = self.base_layer(x_d)
            wx = wx if bias is None else wx - bias.to(wx.dtype)
        dora = (g - 1) * wx + g * (lora * self.scale)
        return out + dora.to(out.dtype)

    def extra_repr(self) -> str:
        kind = "DoRA" if self.use_dora else "LoRA"
        rs = ", rslora" if self.rslora else ""
        return f"{kind} r={self.r}, alpha={self.alpha:g}, scale={self.scale:g}{rs}"
