"""Fixtures for the quant tests: tiny transformers Qwen2 checkpoints written once per session.

`aligned`: hidden 64 / MLP 128, every linear's input width a multiple of the block size
(bitsandbytes' AVX-512 CPU dequantisation kernel is only correct for those, see
test_codec.py::test_bnb_cpu_dequant_bug_documented). `odd`: the default tiny shape (hidden 48,
MLP 88): rows that straddle blocks.
"""

from __future__ import annotations

import pytest

from tests.helpers import tiny_checkpoint


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant_ckpts")
    aligned = tiny_checkpoint(root / "aligned", seed=3, hidden_size=64, intermediate_size=128)
    odd = tiny_checkpoint(root / "odd", seed=4)
    return {"aligned": aligned, "odd": odd}


@pytest.fixture(autouse=True)
def _no_torch_compile():
    """bitsandbytes wraps its generic CPU kernels in torch.compile; compiling (and recompiling
    per shape) would dominate these tests' time, and eager gives the same values."""
    import torch

    with torch.compiler.set_stance("force_eager"):
        yield
