"""The model shapes the benchmarks train, beside the published ones of QwenConfig.preset.

    from shapes import bench_config          # scripts in benchmarks/ have this folder on sys.path
    cfg = bench_config("bench-moe", torch_dtype="bfloat16")

These are not checkpoints anyone downloads: they keep a published family's proportions
(vocabulary, head sizes, layer pattern) at a size a 2-core CPU trains in seconds, so a side by
side run against transformers + PEFT finishes. Any other name is a QwenConfig preset.
"""

from __future__ import annotations

from typing import Any

BENCH_SHAPES: dict[str, dict[str, Any]] = {
    # ~100M parameters, Qwen2.5's vocabulary and tied head: the default of every CPU benchmark.
    "bench-100m": dict(
        vocab_size=151936, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True,
    ),
    # Qwen3.5 text: its vocabulary, head sizes and layer pattern (3 Gated DeltaNet layers, then
    # 1 gated full attention) at ~150M parameters.
    "qwen3.5-bench": dict(
        model_type="qwen3_5_text", vocab_size=248320, hidden_size=512, intermediate_size=1536,
        num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
        partial_rotary_factor=0.25, attention_bias=False, tie_word_embeddings=True,
        linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=64, linear_value_head_dim=64,
        rope_theta=10_000_000.0,
    ),
    # Qwen3-MoE: Qwen3-30B-A3B's proportions (128 -> 32 experts, top 8 -> 4).
    "bench-moe": dict(
        vocab_size=151936, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
        num_attention_heads=8, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
        attention_bias=False, qk_norm=True, model_type="qwen3_moe", num_experts=32, num_experts_per_tok=4,
        moe_intermediate_size=192, norm_topk_prob=True,
    ),
}


def bench_config(name: str, **overrides: Any):
    """The QwenConfig of a benchmark shape (BENCH_SHAPES) or of a published preset."""
    from models.qwen import QwenConfig

    if name in BENCH_SHAPES:
        return QwenConfig(**{**BENCH_SHAPES[name], **overrides})
    return QwenConfig.preset(name, **overrides)
