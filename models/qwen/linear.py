"""`Linear`: nn.Linear whose bf16 matmul on a CPU without a bf16 unit goes through the fp32
kernels (models.qwen.cpu_fast_paths.bf16_linear: the same result, faster); same parameters."""

from __future__ import annotations

import torch
from torch import nn

from .cpu_fast_paths import bf16_linear


class Linear(nn.Linear):
    """nn.Linear; y = x Wᵀ + b."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bf16_linear(x, self.weight, self.bias)
