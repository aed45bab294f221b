"""Qwen3-MoE (`qwen3_moe`, transformers' `Qwen3MoeForCausalLM`): Qwen3-30B-A3B, Qwen3-235B-A22B.

Qwen3 attention; the MLP of a sparse layer is a router over `num_experts` SwiGLU experts of width
`moe_intermediate_size` (top `num_experts_per_tok`, models/qwen/moe.py); layers in
`mlp_only_layers` or off the `decoder_sparse_step` grid keep a dense MLP of `intermediate_size`.
Checkpoints store one tensor per expert (the published layout) or transformers' fused
`mlp.experts.gate_up_proj` / `down_proj` (split on load: moe.map_fused_experts).
"""

from __future__ import annotations

from ..config import MOE_DEFAULTS, QwenConfig
from ..errors import ConfigError
from . import register
from .qwen3 import Qwen3Family


class Qwen3MoeFamily(Qwen3Family):
    name = "qwen3_moe"
    model_type = "qwen3_moe"
    architecture = "Qwen3MoeForCausalLM"
    sequence_classification = "Qwen3MoeForSequenceClassification"
    moe = True
    gguf_architecture = "qwen3moe"
    # PEFT 0.21 converts Qwen3-MoE expert adapters onto transformers' fused experts with
    # gate_up_proj's alpha doubled, which is wrong for rsLoRA (lora/peft_io.py warns).
    peft_doubles_expert_alpha = True

    def extra_known_keys(self) -> set:
        return {*MOE_DEFAULTS, "num_experts", "num_local_experts", "mlp_only_layers"}

    def moe_from_hf(self, raw: dict, source: str) -> dict:
        """The Qwen3-MoE fields of a config.json (num_experts or its alias num_local_experts)."""
        num_experts = raw.get("num_experts", raw.get("num_local_experts"))
        if num_experts is None:
            raise ConfigError(f"{source}: model_type 'qwen3_moe' needs 'num_experts' (or 'num_local_experts')")
        out = {k: raw.get(k, default) for k, default in MOE_DEFAULTS.items()}
        out["num_experts"] = num_experts
        out["mlp_only_layers"] = list(raw.get("mlp_only_layers") or [])
        for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step"):
            if isinstance(out[key], bool) or not isinstance(out[key], int):
                raise ConfigError(f"{source}: {key} must be an integer, got {out[key]!r}")
        return out

    def to_hf(self, cfg: QwenConfig) -> dict:
        out = super().to_hf(cfg)
        out.update(
            # The published checkpoints' spelling (transformers also accepts num_local_experts).
            num_experts=cfg.num_experts,
            num_experts_per_tok=cfg.num_experts_per_tok,
            moe_intermediate_size=cfg.moe_intermediate_size,
            norm_topk_prob=cfg.norm_topk_prob,
            decoder_sparse_step=cfg.decoder_sparse_step,
            mlp_only_layers=list(cfg.mlp_only_layers),
            output_router_logits=cfg.output_router_logits,
            router_aux_loss_coef=cfg.router_aux_loss_coef,
        )
        return out


QWEN3_MOE = register(Qwen3MoeFamily())
