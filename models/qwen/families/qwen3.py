"""Qwen3 (`qwen3`, transformers' `Qwen3ForCausalLM`).

Qwen2's decoder without the qkv bias (attention_bias defaults to False; when set, o_proj has
one too), RMSNorm over head_dim on q and k before RoPE (qk_norm), an explicit head_dim. Its
config.json is the flat Qwen2 one (qwen2.py's parser).
"""

from __future__ import annotations

from . import register
from .qwen2 import Qwen2Family


class Qwen3Family(Qwen2Family):
    name = "qwen3"
    model_type = "qwen3"
    architecture = "Qwen3ForCausalLM"
    sequence_classification = "Qwen3ForSequenceClassification"
    o_proj_bias = True
    gguf_architecture = "qwen3"
    qwen3_attention = True


QWEN3 = register(Qwen3Family())
