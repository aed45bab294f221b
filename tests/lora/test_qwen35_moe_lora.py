"""LoRA and QLoRA on Qwen3.5-MoE against PEFT on transformers' Qwen3_5MoeForCausalLM (fp32, tiny
random models): "all-linear" covers attention, the Gated DeltaNet projections, every routed expert
and the shared expert, never the router or shared_expert_gate; the adapter goes to disk in PEFT's
fused-expert layout (PEFT does not convert per-expert adapters for this family, see
lora/fused_experts.py) and PEFT loads it with the same logits, loss and gradients; PEFT's own
fused adapters load here; NF4 experts train and merge into the 16-bit weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora
from lora.config import AdapterError
from models.qwen import load
from models.qwen.moe import SharedExpertGate, TopKRouter
from quant import NF4Quantizer
from tests.helpers import assert_grads_match, assert_logits_match, max_rel_err, random_ids
from tests.lora.conftest import randomise_adapters
from tests.lora.test_moe_lora import R, peft_grad, peft_lora_grads, peft_model, train_save_and_merge
from tests.models.test_qwen35_moe import hf_qwen35_moe

pytestmark = pytest.mark.filterwarnings("ignore:.*falling back to its reference PyTorch implementation")

ALPHA = 8
# Adapter weights of the order of the base weights (std 0.02): the adapter moves the logits by
# ~80% of their scale, yet does not swamp the base as std 0.2 would (where merged and unmerged
# fp32 evaluations already differ by ~6e-6 in PEFT itself).
STD = 0.05
ALL_LINEAR = ["down_proj", "gate_proj", "in_proj_a", "in_proj_b", "in_proj_qkv", "in_proj_z", "k_proj", "o_proj",
              "out_proj", "q_proj", "up_proj", "v_proj"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen35_moe_lora") / "ckpt"
    hf_qwen35_moe(seed=4).save_pretrained(path)
    return path


def load_ours(path):
    return load(path, dtype=torch.float32)


def load_hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_all_linear_adapts_experts_and_shared_expert_never_the_gates(ckpt):
    model = lora.inject(load_ours(ckpt), r=R, alpha=ALPHA)
    cfg = model.config
    adapted = lora.adapter_modules(model)
    per_moe = 3 * cfg.num_experts + 3  # gate/up/down of every routed expert and of the shared one
    mixers = {"linear_attention": 5, "full_attention": 4}  # in_proj_qkv/z/b/a + out_proj; q/k/v/o
    assert len(adapted) == sum(mixers[t] + per_moe for t in cfg.layer_types)
    assert "model.layers.1.mlp.shared_expert.down_proj" in adapted and "model.layers.0.mlp.experts.5.up_proj" in adapted
    assert not any(n.endswith(("shared_expert_gate", "mlp.gate", "conv1d", "lm_head")) for n in adapted)
    assert all(not p.requires_grad for n, m in model.named_modules() if isinstance(m, (TopKRouter, SharedExpertGate))
               for p in m.parameters())
    assert lora.config_of(model).target_modules == ALL_LINEAR

    # named explicitly, the shared-expert gate is a linear like any other; the router never is
    gates = lora.inject(load_ours(ckpt), r=R, alpha=ALPHA, targets=["shared_expert_gate"])
    assert sorted(lora.adapter_modules(gates)) == [f"model.layers.{i}.mlp.shared_expert_gate" for i in range(3)]
    with pytest.raises(ValueError, match="the MoE router mlp.gate is not a linear layer"):
        lora.inject(load_ours(ckpt), targets=["gate"])


@pytest.mark.parametrize("rslora", [False, True])
def test_adapter_loads_in_peft_with_the_same_logits(ckpt, tmp_path, rslora):
    model = lora.inject(load_ours(ckpt), r=R, alpha=ALPHA, dropout=0.05, rslora=rslora)
    randomise_adapters(model, seed=7, std=STD)
    model.eval()
    lora.save(model, tmp_path / "adapter")

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ALL_LINEAR and config["lora_dropout"] == 0.0
    assert config["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    gate_up_alpha = ALPHA * (2 ** 0.5 if rslora else 2)  # rank 2r, and the scale of every other module
    assert config["rank_pattern"] == {r".*\.gate_up_proj": 2 * R}
    assert config["alpha_pattern"][r".*\.gate_up_proj"] == pytest.approx(gate_up_alpha)
    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    E, H = model.config.num_experts, model.config.hidden_size
    assert keys["base_model.model.model.layers.2.mlp.experts.lora_B.weight"].shape == (H, R * E)  # down_proj
    assert keys["base_model.model.model.layers.2.mlp.experts.base_layer.lora_A.weight"].shape == (2 * R * E, H)
    assert not any(".experts.0." in k for k in keys)

    peft = peft_model(load_hf(ckpt), tmp_path / "adapter").eval()
    assert set(peft.peft_config["default"].target_parameters) == {"mlp.experts.down_proj", "mlp.experts.gate_up_proj"}
    ids = random_ids(2, 70, seed=1)  # crosses the delta rule's 64-token chunk
    with torch.no_grad():
        ours = model(ids)
        with peft.disable_adapter():
            assert max_rel_err(ours, peft(ids).logits) > 0.1  # the adapter matters
        with lora.disable_adapters(model):
            assert max_rel_err(ours, model(ids)) > 0.1
        assert_logits_match(ours, peft, ids)
    # and back into this library: every expert's own A and B again, the same logits
    again = lora.load(load_ours(ckpt), tmp_path / "adapter")
    assert sorted(lora.adapter_modules(again)) == sorted(lora.adapter_modules(model))
    with torch.no_grad():
        assert torch.equal(again(ids), ours)


def test_loss_and_gradients_match_peft(ckpt, tmp_path):
    """Training through PEFT's fused wrapper and through per-expert adapters: same loss, same
    gradient for every A and B (PEFT's gate_up B is block-diagonal here, and its off-diagonal
    blocks, which do not exist in ours, start at zero)."""
    training_matches_peft(ckpt, tmp_path)


def training_matches_peft(ckpt, tmp_path) -> None:
    """An all-linear adapter of ours, saved and loaded by PEFT onto transformers' model of `ckpt`:
    one training forward + backward of each gives the same loss and every A and B gradient."""
    model = lora.inject(load_ours(ckpt), r=R, alpha=ALPHA)
    randomise_adapters(model, seed=3, std=STD)
    lora.save(model, tmp_path / "adapter")
    peft = peft_model(load_hf(ckpt), tmp_path / "adapter", trainable=True).train()
    model.train()
    ids = random_ids(2, 40, seed=3)
    labels = ids.clone()
    labels[1, :9] = -100
    assert_grads_match(model, peft, ids, labels=labels, ref_grad=peft_grad)
    assert set(peft_lora_grads(peft)) == set(lora.adapter_modules(model))  # every adapter compared


def test_peft_trained_adapters_load(ckpt, tmp_path):
    """PEFT's own "all-linear" + fused experts (rank r on gate_up_proj: gate and up share A; and
    its all-linear adapts shared_expert_gate) loads with the same logits; a rank-2r gate_up whose B
    is not block-diagonal (no pair of rank-r adapters) is refused naming the tensor."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear",
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    peft = get_peft_model(load_hf(ckpt), config)
    randomise_adapters(peft, seed=5, std=STD)
    peft.save_pretrained(tmp_path / "peft")
    ours = lora.load(load_ours(ckpt), tmp_path / "peft")
    assert "model.layers.0.mlp.shared_expert_gate" in lora.adapter_modules(ours)
    ids = random_ids(2, 33, seed=2)
    with torch.no_grad():
        assert_logits_match(ours(ids), peft.eval(), ids)

    model = lora.inject(load_ours(ckpt), r=R, alpha=ALPHA)
    lora.save(model, tmp_path / "ours")
    file = tmp_path / "ours" / "adapter_model.safetensors"
    tensors = load_file(str(file))
    key = "base_model.model.model.layers.1.mlp.experts.base_layer.lora_B.weight"
    tensors[key] = tensors[key] + 0.01  # every block, off-diagonal ones included
    save_file(tensors, str(file))
    with pytest.raises(AdapterError, match=f"{key}: gate_up_proj's rank-{2 * R} B is not block-diagonal"):
        lora.load(load_ours(ckpt), tmp_path / "ours")


def test_dora_keeps_the_per_expert_layout_and_says_so(ckpt, tmp_path):
    model = lora.inject(load_ours(ckpt), r=R, alpha=ALPHA, dora=True)
    randomise_adapters(model, seed=2, std=STD)
    with pytest.warns(UserWarning, match="routed-expert adapters written per expert, which PEFT does not load for "
                                         "qwen3_5_moe_text .*: PEFT's fused-expert LoRA has no DoRA"):
        lora.save(model, tmp_path / "adapter")
    assert "target_parameters" not in json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    again = lora.load(load_ours(ckpt), tmp_path / "adapter")
    ids = random_ids(1, 12, seed=4)
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))


def test_qlora_experts_merge_into_the_16_bit_weights(ckpt, tmp_path):
    """NF4 routed and shared experts + LoRA: trains (adapters only), merges into the dequantised
    weights, and the same adapter merged into the original 16-bit weights gives PEFT's logits,
    unmerged and merged, on transformers' model."""
    from quant import NF4Linear

    q = load(ckpt, dtype=torch.float32, quantize=NF4Quantizer())
    lora.inject(q, r=R, alpha=ALPHA)
    mlp = q.model.layers[2].mlp
    assert isinstance(mlp.experts[3].down_proj.base_layer, NF4Linear)
    assert isinstance(mlp.shared_expert.up_proj.base_layer, NF4Linear)
    assert type(mlp.shared_expert_gate) is SharedExpertGate  # 16-bit, no adapter
    randomise_adapters(q, seed=6, std=STD)
    merged, ids = train_save_and_merge(q, tmp_path / "adapter")
    assert isinstance(merged.model.layers[2].mlp.experts[3].down_proj, torch.nn.Linear)

    full = lora.merge(lora.load(load_ours(ckpt), tmp_path / "adapter"))
    peft = peft_model(load_hf(ckpt), tmp_path / "adapter").eval()
    with torch.no_grad():
        got = full(ids)
        assert_logits_match(got, peft, ids)
        assert_logits_match(got, peft.merge_and_unload(), ids)
