"""Memory report for QLoRA: predicted bytes per component next to the measured peak.

Components: NF4 weights (packed codes + all statistics + their biases), other frozen or
unquantised parameters (embeddings, head, norms), LoRA parameters, optimizer state (the
optimizer's actual tensors when given, else AdamW's two fp32 moments per trainable value).
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .linear import NF4Linear


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


@dataclass
class MemoryReport:
    """Predicted bytes per component; `measured_peak` from RSS (CPU) or the CUDA allocator."""

    components: dict[str, int] = field(default_factory=dict)
    measured_peak: Optional[int] = None
    measured_what: str = ""

    @property
    def predicted_total(self) -> int:
        return sum(self.components.values())

    def format(self) -> str:
        mib = lambda b: f"{b / 2**20:10.1f} MiB"  # noqa: E731
        lines = [f"{name:<28}{mib(b)}" for name, b in self.components.items()]
        lines.append(f"{'predicted total':<28}{mib(self.predicted_total)}")
        if self.measured_peak is not None:
            lines.append(f"{'measured peak (' + self.measured_what + ')':<28}{mib(self.measured_peak)}")
        return "\n".join(lines)


def memory_report(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None, device: Optional[str] = None) -> MemoryReport:
    """Predict the memory of `model` (+ optimizer) by component and measure the peak so far."""
    nf4, nf4_ids = 0, set()
    for m in model.modules():
        if isinstance(m, NF4Linear):
            nf4 += m.quant.nbytes()   # packed (the weight Parameter) + statistics
            nf4_ids.add(id(m.weight))
            if m.bias is not None:
                nf4 += _nbytes(m.bias)
                nf4_ids.add(id(m.bias))
    lora = other = trainable = 0
    seen = set(nf4_ids)
    for name, p in model.named_parameters(remove_duplicate=True):
        if id(p) in seen:
            continue
        seen.add(id(p))
        if ".lora_" in name or name.startswith("lora_"):
            lora += _nbytes(p)
        else:
            other += _nbytes(p)
        if p.requires_grad:
            trainable += p.numel()
    if optimizer is not None:
        opt = sum(_nbytes(v) for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor))
        if not optimizer.state:  # not stepped yet: predict AdamW
            opt = 8 * trainable
    else:
        opt = 8 * trainable  # AdamW: exp_avg + exp_avg_sq in fp32
    report = MemoryReport(
        components={
            "nf4 weights (+stats, bias)": nf4,
            "unquantised params": other,
            "lora params": lora,
            "optimizer state": opt,
        }
    )
    dev = device or next((p.device.type for p in model.parameters()), "cpu")
    if dev == "cuda" and torch.cuda.is_available():
        report.measured_peak, report.measured_what = torch.cuda.max_memory_allocated(), "cuda allocator"
    else:
        report.measured_peak, report.measured_what = peak_rss_bytes(), "process RSS"
    return report
