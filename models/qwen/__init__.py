"""From-scratch Qwen decoder (Qwen2, Qwen2.5, Qwen3, Qwen3-MoE, Qwen3.5 text, Qwen-7B v1 weights), HF
checkpoint I/O, tokenizer and generation.

    from models.qwen import QwenConfig, Qwen, Tokenizer, load, save, generate
"""

from .attention import KVCache
from .checkpoint import CheckpointError, Quantizer, load, save
from .config import ConfigError, QwenConfig
from .generation import generate, sample_next
from .loss import IGNORE_INDEX
from .special_tokens import CHAT_STOP_IDS, ENDOFTEXT, ENDOFTEXT_ID, IM_END, IM_END_ID, IM_START, IM_START_ID
from .model import Qwen

from .tokenizer import Tokenizer

__all__ = [
    "QwenConfig", "Qwen", "Tokenizer", "load", "save", "generate", "sample_next", "KVCache",
    "CheckpointError", "ConfigError", "Quantizer", "ENDOFTEXT_ID", "IM_START_ID", "IM_END_ID",
    "ENDOFTEXT", "IM_START", "IM_END", "CHAT_STOP_IDS", "IGNORE_INDEX",
]
