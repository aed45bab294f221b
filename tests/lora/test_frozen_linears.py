"""The linears a family keeps 16-bit and out of "all-linear" (Family.frozen_linears: Qwen3.5-MoE's
and Qwen3-Next's shared_expert_gate) are the same for the three readers of that one declaration:
the streaming 4-bit load (checkpoint.quantizable_linears), quant.quantize_model and lora.inject."""

import pytest
from torch import nn

import lora
import quant
from models.qwen import Qwen, QwenConfig
from models.qwen.checkpoint import quantizable_linears

SHAPES = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
              head_dim=16, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
              linear_num_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
              shared_expert_intermediate_size=8, layer_types=["linear_attention", "full_attention"])


@pytest.mark.parametrize("model_type,intermediate", [("qwen3_5_moe_text", 0), ("qwen3_next", 16), ("qwen3_moe", 16)])
def test_frozen_linears_agree(model_type, intermediate):
    shapes = dict(SHAPES, intermediate_size=intermediate)
    if model_type == "qwen3_moe":
        shapes = {k: v for k, v in shapes.items() if not k.startswith(("linear_", "shared_", "layer_types"))}
    model = Qwen(QwenConfig(model_type=model_type, **shapes))
    decoder = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.layers.")}
    frozen = {n for n in decoder if n.rsplit(".", 1)[-1] in model.config.family.frozen_linears()}
    if model_type == "qwen3_moe":
        assert not frozen
    else:
        assert frozen == {f"model.layers.{i}.mlp.shared_expert_gate" for i in range(2)}

    assert decoder - set(quantizable_linears(model)) == frozen
    adapted = set(lora.adapter_modules(lora.inject(Qwen(model.config), r=2, targets="all-linear")))
    assert decoder - adapted == frozen
    quant.quantize_model(model, skip=("lm_head",))
    assert {n for n in decoder if not isinstance(model.get_submodule(n), quant.NF4Linear)} == frozen
