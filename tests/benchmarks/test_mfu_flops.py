"""benchmarks/mfu.py's model-FLOP formula against torch's FLOP counter over our own step.

FlopCounterMode counts every matmul the forward and backward dispatch (mm, addmm, bmm, ...):
an independent count of what the step really multiplies. Attention runs on SDPA's math
backend here, whose q.k^T and p.v are plain bmm calls over the whole square (no causal
skipping), so the formula is evaluated with causal=False. FLOP counts are integers: the
bound is equality.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, addmm_flop

import lora
from models.qwen import Qwen, QwenConfig
from tests.helpers import TINY_QWEN2

ROOT = Path(__file__).resolve().parents[2]


def _mfu():
    spec = importlib.util.spec_from_file_location("mfu_bench", ROOT / "benchmarks" / "mfu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# addmm_ (the head's in-place weight-gradient accumulation in full training) is the same product
# as addmm; the counter's table lists only the out-of-place op. Its formula is already wrapped to
# take tensors (`_get_raw` tells FlopCounterMode not to wrap it again).
ADDMM_INPLACE = functools.partial(addmm_flop)
ADDMM_INPLACE._get_raw = True


def _count(model, ids) -> int:
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False,
                                                         custom_mapping={torch.ops.aten.addmm_: ADDMM_INPLACE}) as fc:
        model(ids, labels=ids).backward()
    return fc.get_total_flops()


@pytest.mark.parametrize("mode, checkpointing", [("lora", False), ("lora", True), ("full", False)])
def test_step_flops_match_the_flop_counter(mode, checkpointing):
    mfu = _mfu()
    torch.manual_seed(0)
    cfg = QwenConfig(**{k: v for k, v in TINY_QWEN2.items()})
    model = Qwen(cfg)
    r, batch, seq = 4, 2, 12
    if mode == "lora":
        lora.inject(model, r=r, alpha=8, dropout=0.0, targets="all-linear")
        for name, p in model.named_parameters():  # B starts at zero; nonzero keeps every product live
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
    model.enable_gradient_checkpointing(checkpointing)
    model.train()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
    got = _count(model, ids)
    want = mfu.step_flops(cfg, batch, seq, mode, r=r, causal=False)
    assert got == want["hardware" if checkpointing else "model"], (got, want)
    # and the terms are not vacuous: each one changes the total
    assert want["attention"] > 0 and want["head"] > 0 and (want["adapters"] > 0) == (mode == "lora")
