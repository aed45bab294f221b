"""Fixtures shared by the tokenizer and chat-template tests."""

from __future__ import annotations

import pytest

from tests.models.tokenizer_dirs import save_base


@pytest.fixture(scope="session")
def qwen25_dir(tmp_path_factory):
    """Qwen2.5's real tokenizer saved once by our save_pretrained (eos <|im_end|>, as an SFT output)."""
    return save_base(tmp_path_factory)
