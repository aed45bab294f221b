"""Qwen3-Next (`qwen3_next`, transformers' `Qwen3NextForCausalLM`): Qwen3-Next-80B-A3B
Instruct / Thinking, Qwen3-Coder-Next. Everything this family does differently lives here.

It is the first release of Qwen3.5's hybrid stack, and shares its pieces (qwen3_5.HybridFamily):
Gated DeltaNet layers (linear_attention.py) between gated full-attention layers
(qwen35.GatedAttention, partial RoPE), zero-centred RMSNorms norm(x) * (1 + w) on the blocks, on
q / k and at the end, the plain-weight gated norm inside the linear layers, and the routed +
shared-expert MoE block (moe.SharedExpertMoeBlock, shared_expert_gate kept 16-bit and unadapted).
What differs:

* the linear layers' input projections are fused and interleaved per key head
  (`FusedGatedDeltaNet`): in_proj_qkvz [2*key_dim + 2*value_dim, hidden] and in_proj_ba
  [2*v_heads, hidden] instead of Qwen3.5's in_proj_qkv / in_proj_z / in_proj_b / in_proj_a;
* the MoE placement is Qwen3-MoE's: a layer is sparse iff (i + 1) % decoder_sparse_step == 0 and
  i is not in mlp_only_layers, the others keep a dense SwiGLU of intermediate_size; the router
  renormalises its top-k only when norm_topk_prob (default True);
* config.json is flat (no text_config), with Qwen3NextConfig's defaults for absent keys.

Checkpoints: the published ones (transformers converts them with qwen2_moe's per-expert patterns)
and save_pretrained store one tensor per expert
(`mlp.experts.{e}.gate_proj.weight`, ...), as `save` writes; transformers' fused in-memory
layout (mlp.experts.gate_up_proj / down_proj) loads too. Their multi-token-prediction head
(`mtp.*`) is skipped on load, as transformers skips it.
"""

from __future__ import annotations

import torch

from typing import Optional

from torch import nn

from ..config import QwenConfig, _rope_from_hf, default_layer_types, dtype_from_name, dtype_name
from ..errors import ConfigError
from ..linear import Linear
from ..linear_attention import GatedDeltaNet
from . import check_architectures, common_hf, register
from .qwen3_5 import LINEAR_ATTENTION_KEYS, HybridFamily

MODEL_TYPE = "qwen3_next"
ARCHITECTURE = "Qwen3NextForCausalLM"

# Qwen3NextConfig's defaults (transformers 5.25) for the keys a config.json may leave out.
DEFAULTS = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=48, num_attention_heads=16,
    num_key_value_heads=2, head_dim=256, max_position_embeddings=32768, rms_norm_eps=1e-6,
    tie_word_embeddings=False, attention_bias=False, linear_conv_kernel_dim=4, linear_key_head_dim=128,
    linear_value_head_dim=128, linear_num_key_heads=16, linear_num_value_heads=32, decoder_sparse_step=1,
    moe_intermediate_size=512, shared_expert_intermediate_size=512, num_experts_per_tok=10, num_experts=512,
    norm_topk_prob=True, output_router_logits=False, router_aux_loss_coef=0.001, partial_rotary_factor=0.25,
)
_INT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "max_position_embeddings", "decoder_sparse_step",
             "moe_intermediate_size", "shared_expert_intermediate_size", "num_experts_per_tok", "num_experts",
             *LINEAR_ATTENTION_KEYS)
_MOE_KEYS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
             "norm_topk_prob", "decoder_sparse_step", "output_router_logits", "router_aux_loss_coef")
_KNOWN = {*DEFAULTS, "model_type", "architectures", "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype",
          "dtype", "transformers_version", "rope_theta", "rope_parameters", "rope_scaling", "layer_types",
          "full_attention_interval", "mlp_only_layers", "hidden_act", "use_cache", "attention_dropout",
          "initializer_range"}


# ---------------------------------------------------------------------- config.json
def config_from_hf(raw: dict, source: str) -> QwenConfig:
    """A Qwen3NextForCausalLM config.json dict -> QwenConfig, read as transformers reads it.

    partial_rotary_factor: the one inside rope_parameters / rope_scaling wins over the top-level
    key (default 0.25); layer_types default to every full_attention_interval-th (4th) layer full.
    """
    check_architectures(raw, source, ARCHITECTURE)
    if raw.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: hidden_act {raw['hidden_act']!r} is not supported (expected 'silu')")
    values = {k: raw.get(k, default) for k, default in DEFAULTS.items()}
    for key in _INT_KEYS:
        if isinstance(values[key], bool) or not isinstance(values[key], int):
            raise ConfigError(f"{source}: {key} must be an integer, got {values[key]!r}")
    rope = {k: raw.get(k) for k in ("rope_scaling", "rope_parameters")}
    partial = raw.get("partial_rotary_factor", DEFAULTS["partial_rotary_factor"])
    for key, value in rope.items():  # Qwen2/3's rope reader refuses partial rotary: take it out first
        if isinstance(value, dict) and "partial_rotary_factor" in value:
            value = dict(value)
            partial = value.pop("partial_rotary_factor")
            rope[key] = value
    rope_theta, rope_scaling = _rope_from_hf({"max_position_embeddings": values["max_position_embeddings"],
                                              "rope_theta": raw.get("rope_theta", 10000.0), **rope}, source)
    layers = values["num_hidden_layers"]
    layer_types = raw.get("layer_types") or default_layer_types(layers, int(raw.get("full_attention_interval", 4)))
    dtype = raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"
    n_heads = values["num_attention_heads"]
    return QwenConfig(
        **{k: values[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                  "num_attention_heads", "head_dim", "max_position_embeddings",
                                  *LINEAR_ATTENTION_KEYS, *_MOE_KEYS)},
        num_key_value_heads=values["num_key_value_heads"] or n_heads,
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        partial_rotary_factor=float(partial),
        rms_norm_eps=float(values["rms_norm_eps"]),
        tie_word_embeddings=bool(values["tie_word_embeddings"]),
        attention_bias=bool(values["attention_bias"]),
        qk_norm=True,
        model_type=MODEL_TYPE,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
        pad_token_id=raw.get("pad_token_id"),
        torch_dtype=dtype_name(dtype_from_name(dtype)),
        layer_types=list(layer_types),
        mlp_only_layers=list(raw.get("mlp_only_layers") or []),
        extra={k: v for k, v in raw.items() if k not in _KNOWN},
    )


def config_to_hf(cfg: QwenConfig) -> dict:
    """The config.json dict of a Qwen3NextForCausalLM.

    partial_rotary_factor is written inside rope_parameters (which transformers 5 reads) and at
    the top level (which transformers 4, vLLM and llama.cpp's converter read)."""
    out = common_hf(cfg)
    out.update(
        intermediate_size=cfg.intermediate_size,
        rope_theta=cfg.rope_theta,
        partial_rotary_factor=cfg.partial_rotary_factor,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta,
                         "partial_rotary_factor": cfg.partial_rotary_factor, **(cfg.rope_scaling or {})},
        layer_types=list(cfg.layer_types),
        mlp_only_layers=list(cfg.mlp_only_layers),
        **{k: getattr(cfg, k) for k in (*LINEAR_ATTENTION_KEYS, *_MOE_KEYS)},
    )
    if cfg.rope_scaling:
        out["rope_scaling"] = dict(cfg.rope_scaling)  # the legacy key older readers take
    return out


# ---------------------------------------------------------------------- the linear layer
class FusedGatedDeltaNet(GatedDeltaNet):
    """Qwen3-Next's Gated DeltaNet: Qwen3.5's layer with two fused input projections.

    in_proj_qkvz [2*key_dim + 2*value_dim, hidden] holds, per key head h (of k_heads), the rows
    [q_h (Dk) | k_h (Dk) | v of its g = v_heads / k_heads value heads (g*Dv) | z of them (g*Dv)];
    in_proj_ba [2*v_heads, hidden] holds per key head [b of its g value heads | a of them]. Value
    head j of key head h is value head h*g + j, the grouping the delta rule uses (each q/k head
    serves g consecutive value heads). This is transformers' fix_query_key_value_ordering.
    """

    def build_projections(self, config: QwenConfig) -> None:
        hidden = config.hidden_size
        self.in_proj_qkvz = Linear(hidden, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.in_proj_ba = Linear(hidden, 2 * self.num_v_heads, bias=False)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, hidden] -> (qkv [B, T, conv_dim] as [q | k | v], z [B, T, v_heads, v_dim],
        b [B, T, v_heads], a [B, T, v_heads]): the fused rows regrouped head-major."""
        B, T, _ = x.shape
        Hk, Dk, Dv = self.num_k_heads, self.head_k_dim, self.head_v_dim
        g = self.num_v_heads // Hk
        qkvz = self.in_proj_qkvz(x).view(B, T, Hk, 2 * Dk + 2 * g * Dv)
        q, k, v, z = qkvz.split([Dk, Dk, g * Dv, g * Dv], dim=-1)
        b, a = self.in_proj_ba(x).view(B, T, Hk, 2 * g).split([g, g], dim=-1)
        qkv = torch.cat([q.reshape(B, T, -1), k.reshape(B, T, -1), v.reshape(B, T, -1)], dim=-1)
        return qkv, z.reshape(B, T, self.num_v_heads, Dv), b.reshape(B, T, -1), a.reshape(B, T, -1)


class Qwen3NextFamily(HybridFamily):
    name = MODEL_TYPE
    model_type = MODEL_TYPE
    architecture = ARCHITECTURE
    sequence_classification = "Qwen3NextForSequenceClassification"
    moe = True
    shared_expert = True
    gguf_architecture = "qwen3next"
    gguf_default_mrope = False  # Qwen3NextModel writes no rope sections
    gguf_reorders_v_heads = False  # its fused projections are regrouped by split_qkvz instead
    # PEFT converts it as qwen2_moe: per-expert adapters are written fused, and the shared
    # expert's / a dense MLP's projections as target_parameters (lora/fused_experts.py).
    peft_fused_experts = True
    peft_parameter_targets = True

    def from_hf(self, raw: dict, source: str) -> QwenConfig:
        return config_from_hf(raw, source)

    def to_hf(self, cfg: QwenConfig) -> dict:
        return config_to_hf(cfg)

    def linear_attention_class(self) -> Optional[type[nn.Module]]:
        return FusedGatedDeltaNet


QWEN3_NEXT = register(Qwen3NextFamily())
