"""Qwen-7B v1 (`QWenLMHeadModel`, remote code; config.json model_type `qwen`).

Fused `c_attn` with bias, `intermediate_size` twice the MLP width, `kv_channels`,
`rotary_emb_base`, `layer_norm_epsilon`. It is Qwen2's decoder under other names, so it loads
as `qwen2` (QwenConfig.source_format "qwen-v1"): its tensors are renamed onto the Qwen2 module
names on load (`map_v1_tensor`, c_attn split into q/k/v), `save` writes a Qwen2 checkpoint, a
v1 PEFT adapter is renamed the same way (lora/v1_adapter.py, with `ADAPTER_RENAMES`) and the v1
module names map onto the Qwen2 modules they became (`MODULE_ALIASES`; lora/targets.py accepts
them as target names).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..config import QwenConfig
from ..errors import CheckpointError, ConfigError
from ..special_tokens import ENDOFTEXT_ID
from . import need, register
from .qwen2 import Qwen2Family

SOURCE_FORMAT = "qwen-v1"
ARCHITECTURE = "QWenLMHeadModel"

# A v1 decoder-layer module -> its Qwen2 name (c_attn is split, see map_v1_tensor).
MODULE_RENAMES = {
    "ln_1": "input_layernorm",
    "ln_2": "post_attention_layernorm",
    "attn.c_proj": "self_attn.o_proj",
    "mlp.w1": "mlp.up_proj",
    "mlp.w2": "mlp.gate_proj",
    "mlp.c_proj": "mlp.down_proj",
}
FUSED_QKV = "attn.c_attn"
QKV_NAMES = ("q_proj", "k_proj", "v_proj")
LAYER = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")

# v1 module names and the Qwen2 modules each became: c_attn -> q/k/v_proj, w1 ->
# up_proj, w2 -> gate_proj, mlp.c_proj -> down_proj, attn.c_proj -> o_proj (bare c_proj -> both).
MODULE_ALIASES: dict[str, tuple[str, ...]] = {
    "c_attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn.c_attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "w1": ("mlp.up_proj",),
    "mlp.w1": ("mlp.up_proj",),
    "w2": ("mlp.gate_proj",),
    "mlp.w2": ("mlp.gate_proj",),
    "c_proj": ("self_attn.o_proj", "mlp.down_proj"),
    "attn.c_proj": ("self_attn.o_proj",),
    "mlp.c_proj": ("mlp.down_proj",),
}


def map_v1_tensor(key: str, tensor: torch.Tensor, cfg: QwenConfig) -> list[tuple[str, torch.Tensor]]:
    """Qwen-7B v1 tensor -> [(our key, tensor)]: fused c_attn is split into q/k/v."""
    if key == "transformer.wte.weight":
        return [("model.embed_tokens.weight", tensor)]
    if key == "transformer.ln_f.weight":
        return [("model.norm.weight", tensor)]
    if key == "lm_head.weight":
        return [(key, tensor)]
    m = LAYER.match(key)
    if not m:
        return [(key, tensor)]  # reported as unexpected by the caller
    i, rest = m.group(1), m.group(2)
    prefix = f"model.layers.{i}."
    module, _, kind = rest.rpartition(".")
    if module in MODULE_RENAMES and kind == "weight":
        return [(f"{prefix}{MODULE_RENAMES[module]}.weight", tensor)]
    if module == FUSED_QKV and kind in ("weight", "bias"):
        sizes = [cfg.q_size, cfg.kv_size, cfg.kv_size]
        if tensor.shape[0] != sum(sizes):
            raise CheckpointError(f"{key}: fused c_attn has {tensor.shape[0]} rows, expected {sum(sizes)}")
        q, k, v = torch.split(tensor, sizes, dim=0)
        return [(f"{prefix}self_attn.{n}.{kind}", t) for n, t in zip(QKV_NAMES, (q, k, v))]
    return [(key, tensor)]


class V1Family(Qwen2Family):
    name = "v1"
    model_type = "qwen2"  # loads as Qwen2 (and is saved so)
    reads = ("qwen",)
    source_formats = (SOURCE_FORMAT,)
    architecture = "Qwen2ForCausalLM"
    gguf_architecture = None
    gguf_refusal = ("a Qwen-7B (v1) checkpoint; load it with models.qwen.load and save it with models.qwen.save "
                    "to get a Qwen2-format directory first")

    def reader_architecture(self, model_type: str) -> str:
        return ARCHITECTURE

    def claims(self, architectures: list) -> bool:
        return ARCHITECTURE in architectures

    def from_hf(self, raw: dict, source: str) -> QwenConfig:
        """MHA, fused c_attn with bias, MLP width = intermediate/2."""

        def required(key: str) -> Any:
            return need(raw, source, key, " (Qwen v1 config)")

        hidden = int(required("hidden_size"))
        heads = int(required("num_attention_heads"))
        head_dim = int(raw.get("kv_channels", hidden // heads))
        if raw.get("rotary_pct", 1.0) != 1.0:
            raise ConfigError(f"{source}: rotary_pct {raw['rotary_pct']} is not supported (expected 1.0)")
        dtype = "bfloat16"
        if raw.get("fp16"):
            dtype = "float16"
        if raw.get("fp32"):
            dtype = "float32"
        return QwenConfig(
            vocab_size=int(required("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(required("intermediate_size")) // 2,
            num_hidden_layers=int(required("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=heads,
            head_dim=head_dim,
            max_position_embeddings=int(raw.get("max_position_embeddings", raw.get("seq_length", 8192))),
            rope_theta=float(raw.get("rotary_emb_base", 10000.0)),
            rms_norm_eps=float(raw.get("layer_norm_epsilon", 1e-6)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=True,
            qk_norm=False,
            model_type=self.model_type,
            bos_token_id=ENDOFTEXT_ID,
            eos_token_id=ENDOFTEXT_ID,
            pad_token_id=None,
            torch_dtype=dtype,
            source_format=SOURCE_FORMAT,
        )

    def checkpoint_pairs(self, key: str, tensor: torch.Tensor, cfg: QwenConfig, file: Path):
        return map_v1_tensor(key, tensor, cfg)


V1 = register(V1Family())
