"""Fixtures for the lora tests: tiny random transformers Qwen2 checkpoints (tied and untied)
written once per session, loaded by our `models.qwen.load` and by transformers."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import tiny_checkpoint


@pytest.fixture(scope="session")
def ckpt_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_ckpts")
    return {
        tied: tiny_checkpoint(root / ("tied" if tied else "untied"), tie_word_embeddings=tied, seed=1 + tied)[0]
        for tied in (True, False)
    }


def load_ours(path):
    from models.qwen import load

    return load(path, dtype=torch.float32)


def load_hf(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


@torch.no_grad()
def randomise_adapters(model, seed: int = 0, std: float = 0.2) -> None:
    """Give every trainable tensor a non-trivial value (a fresh adapter is a no-op: B = 0)."""
    g = torch.Generator().manual_seed(seed)
    for _, p in sorted(model.named_parameters()):
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)
