"""Qwen2 / Qwen2.5 (`qwen2`, transformers' `Qwen2ForCausalLM`).

q/k/v projections with bias, o_proj without; plain RMSNorm; every layer softmax attention and
a dense SwiGLU MLP. Checkpoint names are ours as they are. Qwen3 and Qwen3-MoE (qwen3.py,
qwen3_moe.py) read the same flat config.json with this module's parser.
"""

from __future__ import annotations

from typing import Any

from ..config import QwenConfig, _rope_from_hf, dtype_from_name, dtype_name
from ..errors import ConfigError
from . import Family, check_architectures, common_hf, need, register

# config.json keys the flat parser maps onto QwenConfig fields (the rest are kept in `extra`)
KNOWN_KEYS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
    "rope_theta", "rope_parameters", "rope_scaling", "rms_norm_eps", "tie_word_embeddings",
    "attention_bias", "model_type", "architectures", "bos_token_id", "eos_token_id",
    "pad_token_id", "torch_dtype", "dtype", "transformers_version", "use_sliding_window",
    "partial_rotary_factor", "original_max_position_embeddings",
}


class Qwen2Family(Family):
    name = "qwen2"
    model_type = "qwen2"
    architecture = "Qwen2ForCausalLM"
    sequence_classification = "Qwen2ForSequenceClassification"
    o_proj_bias = False  # Qwen2's attention bias is on q/k/v only
    gguf_architecture = "qwen2"
    qwen3_attention = False  # Qwen3: no qkv bias by default, RMSNorm on q and k per head

    def extra_known_keys(self) -> set:
        """config.json keys this family reads beyond KNOWN_KEYS."""
        return set()

    def moe_from_hf(self, raw: dict, source: str) -> dict:
        """QwenConfig's MoE fields from config.json (none for a dense family)."""
        return {}

    def from_hf(self, raw: dict, source: str) -> QwenConfig:
        model_type = raw.get("model_type")
        check_architectures(raw, source, self.architecture, model_type)
        if raw.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window=true is not supported")
        rope_theta, rope_scaling = _rope_from_hf(raw, source)
        qwen3 = self.qwen3_attention
        known = KNOWN_KEYS | self.extra_known_keys()
        moe = self.moe_from_hf(raw, source)
        dtype = raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"

        def required(key: str) -> Any:
            return need(raw, source, key)

        n_heads = int(required("num_attention_heads"))
        return QwenConfig(
            vocab_size=int(required("vocab_size")),
            hidden_size=int(required("hidden_size")),
            intermediate_size=int(required("intermediate_size")),
            num_hidden_layers=int(required("num_hidden_layers")),
            num_attention_heads=n_heads,
            num_key_value_heads=int(raw.get("num_key_value_heads") or n_heads),
            head_dim=raw.get("head_dim"),
            max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            # HF's default for tie_word_embeddings is True in v4 and False in v5 for Qwen2;
            # real Qwen checkpoints always write the key. Absent: follow the common case.
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", not qwen3)),
            qk_norm=qwen3,
            model_type=self.model_type,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=raw.get("eos_token_id"),
            pad_token_id=raw.get("pad_token_id"),
            torch_dtype=dtype_name(dtype_from_name(dtype)),
            extra={k: v for k, v in raw.items() if k not in known},
            **moe,
        )

    def to_hf(self, cfg: QwenConfig) -> dict:
        out = common_hf(cfg)
        out.update(
            intermediate_size=cfg.intermediate_size,
            rope_theta=cfg.rope_theta,
            # transformers v5 reads rope_parameters; v4 reads rope_theta. Write both.
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})},
            # Sliding-window attention is off (from_hf refuses it on); its inert sizes come back as given.
            use_sliding_window=False,
            sliding_window=cfg.extra.get("sliding_window"),
            max_window_layers=cfg.extra.get("max_window_layers", cfg.num_hidden_layers),
            torch_dtype=cfg.torch_dtype,
        )
        if cfg.rope_scaling:
            # v4, vLLM and llama.cpp's converter read the legacy key (v5 prefers it when present).
            out["rope_scaling"] = dict(cfg.rope_scaling)
        return out

    def validate(self, cfg: QwenConfig) -> None:
        from ..config import FULL_ATTENTION

        if cfg.layer_types is not None and set(cfg.layer_types) != {FULL_ATTENTION}:
            from . import FAMILIES, _one_of

            raise ConfigError(f"layer_types {cfg.layer_types}: linear attention needs model_type "
                              f"{_one_of(f.model_type for f in FAMILIES.values() if f.linear_attention_class())}")


QWEN2 = register(Qwen2Family())
