"""Qwen3.5 text models: `qwen3_5_text` (Qwen3_5ForCausalLM) and `qwen3_5_moe_text`
(Qwen3_5MoeForCausalLM, Qwen3.5-35B-A3B and larger), also read from the text part of a
`qwen3_5` / `qwen3_5_moe` (Qwen3_5[Moe]ForConditionalGeneration) checkpoint, whose config.json
holds the text model as `text_config` and whose weights sit under model.language_model.

A hybrid stack of Gated DeltaNet linear-attention layers (linear_attention.py) and gated
full-attention layers (qwen35.GatedAttention), chosen per layer by `layer_types`; zero-centred
RMSNorms norm(x) * (1 + w) on the blocks, on q / k and at the end; partial rotary embeddings.
Qwen3.5-MoE: in *every* layer the MLP is routed experts (softmax, top-k, always renormalised)
plus a shared SwiGLU expert of `shared_expert_intermediate_size` scaled by
sigmoid(`shared_expert_gate`); no dense MLP, so `intermediate_size` is 0. Its config has no
norm_topk_prob / decoder_sparse_step / mlp_only_layers (such keys are kept in `extra`, unused,
as transformers ignores them).

Checkpoints: beside the text model they hold a vision tower (`model.visual.*`) and a
multi-token-prediction head (`mtp.*`); this library trains the text model only, so they are
not loaded, and `save` copies them back from the input's shards (models/qwen/whole.py).
`HybridFamily` is what Qwen3-Next (qwen3_next.py) shares with these families.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from torch import nn

from ..config import QwenConfig, default_layer_types, dtype_from_name, dtype_name
from ..errors import ConfigError
from ..whole import TEXT_PREFIX, our_name
from . import Family, check_architectures, common_hf, need, register

LINEAR_ATTENTION_KEYS = (
    "linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim",
    "linear_num_key_heads", "linear_num_value_heads",
)
# Qwen3_5MoeTextConfig's defaults for its MoE keys (its router always renormalises the top-k).
QWEN35_MOE_DEFAULTS = dict(num_experts=256, num_experts_per_tok=8, moe_intermediate_size=512,
                           shared_expert_intermediate_size=512, output_router_logits=False,
                           router_aux_loss_coef=0.001)
# Qwen3_5TextConfig's defaults for keys a config.json may leave out.
QWEN35_TEXT_DEFAULTS = dict(
    head_dim=256, linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128,
    linear_num_key_heads=16, linear_num_value_heads=32,
)
# Tensors of a Qwen3.5 / Qwen3-Next checkpoint outside the text model: never read by `load`.
SKIPPED_PREFIXES = {"model.visual.": "vision-tower", "mtp.": "multi-token-prediction"}
# source_format of a text model read from a vision-language checkpoint (under model.language_model.)
NESTED_FORMAT = "qwen3_5"
_KNOWN = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_theta", "rope_parameters",
    "rope_scaling", "partial_rotary_factor", "rms_norm_eps", "tie_word_embeddings", "attention_bias",
    "model_type", "architectures", "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype",
    "dtype", "transformers_version", "layer_types", "full_attention_interval", "hidden_act",
    *LINEAR_ATTENTION_KEYS,
}


class HybridFamily(Family):
    """Qwen3.5's layer stack (Qwen3.5 text, Qwen3.5-MoE text, Qwen3-Next)."""

    hybrid = True
    default_attention_bias = False
    gguf_default_mrope = True  # llama.cpp's converter writes a default mrope_section
    gguf_reorders_v_heads = True  # the converter regroups the linear layers' value heads

    def norm_class(self) -> type[nn.Module]:
        from ..qwen35 import ZeroCentredRMSNorm

        return ZeroCentredRMSNorm

    def attention_class(self) -> type[nn.Module]:
        from ..qwen35 import GatedAttention

        return GatedAttention

    def linear_attention_class(self) -> Optional[type[nn.Module]]:
        from ..linear_attention import GatedDeltaNet

        return GatedDeltaNet

    def validate(self, cfg: QwenConfig) -> None:
        """layer_types default to HF's pattern (every 4th layer full attention)."""
        from ..config import FULL_ATTENTION, LINEAR_ATTENTION

        if cfg.layer_types is None:
            cfg.layer_types = default_layer_types(cfg.num_hidden_layers)
        cfg.layer_types = list(cfg.layer_types)
        if len(cfg.layer_types) != cfg.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(cfg.layer_types)} entries, expected num_hidden_layers={cfg.num_hidden_layers}"
            )
        unknown = sorted(set(cfg.layer_types) - {FULL_ATTENTION, LINEAR_ATTENTION})
        if unknown:
            raise ConfigError(f"layer_types: unknown layer type {unknown[0]!r}: expected {FULL_ATTENTION!r} or "
                              f"{LINEAR_ATTENTION!r}")
        if cfg.linear_num_value_heads % cfg.linear_num_key_heads:
            raise ConfigError(
                f"linear_num_value_heads {cfg.linear_num_value_heads} must be a multiple of "
                f"linear_num_key_heads {cfg.linear_num_key_heads}"
            )
        if not 0.0 < cfg.partial_rotary_factor <= 1.0 or cfg.rotary_dim % 2:
            raise ConfigError(
                f"partial_rotary_factor {cfg.partial_rotary_factor}: expected (0, 1] giving an even number of "
                f"rotated dims of head_dim {cfg.head_dim} (got {cfg.rotary_dim})"
            )
        cfg.qk_norm = True  # Qwen3.5's full attention always normalises q and k per head

    # ------------------------------------------------------------------ checkpoint names
    def nested(self, cfg: QwenConfig) -> bool:
        return cfg.source_format == NESTED_FORMAT

    def outside_text(self, key: str, nested: bool) -> bool:
        """A checkpoint tensor that is no part of the text model (never read by `load`): the
        vision tower, the MTP head, and in a nested checkpoint anything beside
        model.language_model.* and lm_head.*."""
        if key.startswith(tuple(SKIPPED_PREFIXES)):
            return True
        return nested and not key.startswith((TEXT_PREFIX, "lm_head."))

    def skip_unread(self, cfg: QwenConfig) -> Optional[Callable[[str], bool]]:
        nested = self.nested(cfg)
        return lambda key: self.outside_text(key, nested)

    def checkpoint_pairs(self, key, tensor, cfg, file):
        nested = self.nested(cfg)
        if self.outside_text(key, nested):
            return None
        if nested:
            key = our_name(key)
        return super().checkpoint_pairs(key, tensor, cfg, file)  # (lm_head.weight; else reported unexpected)


class Qwen35TextFamily(HybridFamily):
    name = "qwen3_5_text"
    model_type = "qwen3_5_text"
    reads = ("qwen3_5_text", "qwen3_5")  # (qwen3_5: the text_config of the vision-language checkpoint)
    source_formats = ("hf", NESTED_FORMAT)
    architecture = "Qwen3_5ForCausalLM"
    gguf_architecture = "qwen35"

    def reader_architecture(self, model_type: str) -> str:
        if model_type == self.model_type:
            return self.architecture
        return self.architecture.replace("ForCausalLM", "ForConditionalGeneration")

    def moe_from_hf(self, text: dict, source: str) -> dict:
        """QwenConfig's MoE fields (none for the dense family)."""
        return {}

    def from_hf(self, raw: dict, source: str) -> QwenConfig:
        outer = raw.get("model_type")
        nested = outer != self.model_type
        moe = self.moe
        check_architectures(raw, source, self.reader_architecture(outer))
        text = raw
        if nested:
            text = raw.get("text_config")
            if not isinstance(text, dict):
                raise ConfigError(f"{source}: model_type {outer!r} needs a 'text_config' object")
            source = f"{source} (text_config)"

        def required(key: str) -> Any:
            return need(text, source, key)

        rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise ConfigError(f"{source}: rope type {rope_type!r} is not supported (only default RoPE)")
        # mrope_section / mrope_interleaved place the 3 position axes of images and video; text
        # tokens have equal positions on all axes, which makes them plain RoPE.
        known = set(_KNOWN)
        if moe:  # (intermediate_size is no key of Qwen3_5MoeTextConfig: a dense width no layer has)
            known = (known - {"intermediate_size"}) | set(QWEN35_MOE_DEFAULTS)
        if text.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act {text['hidden_act']!r} is not supported (expected 'silu')")
        layers = int(required("num_hidden_layers"))
        layer_types = text.get("layer_types") or default_layer_types(layers, int(text.get("full_attention_interval", 4)))
        n_heads = int(required("num_attention_heads"))
        top = raw if nested else {}
        tie = top.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
        dtype = text.get("torch_dtype") or text.get("dtype") or top.get("torch_dtype") or top.get("dtype") or "bfloat16"
        defaults = QWEN35_TEXT_DEFAULTS
        return QwenConfig(
            vocab_size=int(required("vocab_size")),
            hidden_size=int(required("hidden_size")),
            intermediate_size=0 if moe else int(required("intermediate_size")),
            num_hidden_layers=layers,
            num_attention_heads=n_heads,
            num_key_value_heads=int(text.get("num_key_value_heads") or n_heads),
            head_dim=int(text.get("head_dim") or defaults["head_dim"]),
            max_position_embeddings=int(text.get("max_position_embeddings", 32768)),
            rope_theta=float(text.get("rope_theta", rope.get("rope_theta", 10000.0))),
            partial_rotary_factor=float(rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25))),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(tie),
            attention_bias=bool(text.get("attention_bias", False)),
            qk_norm=True,
            model_type=self.model_type,
            bos_token_id=text.get("bos_token_id", top.get("bos_token_id")),
            eos_token_id=text.get("eos_token_id", top.get("eos_token_id")),
            pad_token_id=text.get("pad_token_id", top.get("pad_token_id")),
            torch_dtype=dtype_name(dtype_from_name(dtype)),
            source_format=NESTED_FORMAT if nested else "hf",
            extra={k: v for k, v in text.items() if k not in known},
            layer_types=list(layer_types),
            **{k: int(text.get(k, defaults[k])) for k in LINEAR_ATTENTION_KEYS},
            **self.moe_from_hf(text, source),
        )

    def to_hf(self, cfg: QwenConfig) -> dict:
        """A text-only `qwen3_5_text` / `qwen3_5_moe_text` config (Qwen3_5[Moe]ForCausalLM); for a
        model read from a `qwen3_5[_moe]` checkpoint, `save` writes that checkpoint's own config
        with the values of this one that changed (models/qwen/whole.py)."""
        out = common_hf(cfg)
        out.update(
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta,
                             "partial_rotary_factor": cfg.partial_rotary_factor},
            layer_types=list(cfg.layer_types),
            **{k: getattr(cfg, k) for k in LINEAR_ATTENTION_KEYS},
        )
        out.update(self.moe_to_hf(cfg))
        return out

    def moe_to_hf(self, cfg: QwenConfig) -> dict:
        return {"intermediate_size": cfg.intermediate_size}


class Qwen35MoeTextFamily(Qwen35TextFamily):
    name = "qwen3_5_moe_text"
    model_type = "qwen3_5_moe_text"
    reads = ("qwen3_5_moe_text", "qwen3_5_moe")
    architecture = "Qwen3_5MoeForCausalLM"
    moe = True
    shared_expert = True
    gguf_architecture = "qwen35moe"
    peft_fused_experts = True  # PEFT does not convert per-expert adapters for this model type

    def allows_zero_intermediate_size(self) -> bool:
        return True  # every Qwen3.5-MoE layer is sparse: there is no dense MLP

    def moe_from_hf(self, text: dict, source: str) -> dict:
        """The MoE fields of a Qwen3.5-MoE text config (Qwen3_5MoeTextConfig's defaults for absent keys)."""
        out = {k: text.get(k, default) for k, default in QWEN35_MOE_DEFAULTS.items()}
        for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size"):
            if isinstance(out[key], bool) or not isinstance(out[key], int):
                raise ConfigError(f"{source}: {key} must be an integer, got {out[key]!r}")
        out["output_router_logits"] = bool(out["output_router_logits"])
        out["router_aux_loss_coef"] = float(out["router_aux_loss_coef"])
        return out

    def moe_to_hf(self, cfg: QwenConfig) -> dict:
        # Qwen3_5MoeTextConfig's keys (no norm_topk_prob: it always renormalises)
        return {k: getattr(cfg, k) for k in QWEN35_MOE_DEFAULTS}

    def validate_moe(self, cfg: QwenConfig) -> None:
        super().validate_moe(cfg)
        if cfg.decoder_sparse_step != 1 or cfg.mlp_only_layers:
            raise ConfigError(
                f"decoder_sparse_step {cfg.decoder_sparse_step} / mlp_only_layers {cfg.mlp_only_layers}: every "
                "Qwen3.5-MoE layer is sparse (expected 1 / [])"
            )
        cfg.norm_topk_prob = True  # Qwen3_5MoeTopKRouter always renormalises the top-k weights


QWEN3_5_TEXT = register(Qwen35TextFamily())
QWEN3_5_MOE_TEXT = register(Qwen35MoeTextFamily())
