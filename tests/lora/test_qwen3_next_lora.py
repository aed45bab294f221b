"""LoRA and QLoRA on Qwen3-Next against PEFT on transformers' Qwen3NextForCausalLM (fp32, tiny
random models). "all-linear" covers attention, the fused Gated DeltaNet projections (in_proj_qkvz,
in_proj_ba, out_proj), every routed expert, the shared expert and the dense MLP of mlp_only_layers,
never the router or shared_expert_gate.

PEFT (0.21) converts Qwen3-Next adapters as qwen2_moe ones and maps every gate_proj / up_proj /
down_proj entry of target_modules onto the fused routed experts, dropping the shared expert's and
the dense MLP's adapters. So the adapter is written with the routed experts in PEFT's fused
layout and those projections as target_parameters naming their weights (lora/fused_experts.py),
and PEFT loads it with our logits, loss and gradients.

Tolerances: the logits are compared within FLOOR_FACTOR x PEFT's own fp32-vs-float64 error on the
same inputs (measured on the 70-token check: PEFT's fp32 logits are 6e-7 from its float64 twin, 2.5e-6
with rsLoRA; ours are 6.3e-7 and 1.8e-6 from PEFT's: within about one floor).
"""

from __future__ import annotations

import json

import pytest
import torch

import lora
from models.qwen import load
from models.qwen.moe import SharedExpertGate, TopKRouter
from quant import NF4Quantizer
from tests.helpers import assert_close_to_reference, float64_twin, max_rel_err, random_ids
from tests.lora.conftest import randomise_adapters
from tests.lora.test_moe_lora import R, peft_model, train_save_and_merge
from tests.lora.test_qwen35_moe_lora import load_hf, load_ours, training_matches_peft
from tests.models.test_qwen3_next import hf_qwen3_next

pytestmark = [pytest.mark.filterwarnings("ignore:.*falling back to its reference PyTorch implementation"),
              pytest.mark.filterwarnings("ignore:.*written without tokenizer files")]

ALPHA = 8
STD = 0.05  # adapter weights of the order of the base weights (see test_qwen35_moe_lora.py)
TARGET_MODULES = ["in_proj_ba", "in_proj_qkvz", "k_proj", "o_proj", "out_proj", "q_proj", "v_proj"]
MLP_PARAMETERS = ["mlp.down_proj.weight", "mlp.gate_proj.weight", "mlp.shared_expert.down_proj.weight",
                  "mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.up_proj.weight", "mlp.up_proj.weight"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3_next_lora") / "ckpt"
    hf_qwen3_next(seed=4).save_pretrained(path)
    return path


def test_all_linear_adapts_experts_shared_expert_and_dense_mlp_never_the_gates(ckpt):
    model = lora.inject(load_ours(ckpt), r=R, alpha=ALPHA)
    cfg = model.config
    adapted = lora.adapter_modules(model)
    mixers = {"linear_attention": 3, "full_attention": 4}  # in_proj_qkvz, in_proj_ba, out_proj; q/k/v/o
    mlps = [3 * cfg.num_experts + 3 if cfg.is_sparse_layer(i) else 3 for i in range(cfg.num_hidden_layers)]
    assert len(adapted) == sum(mixers[t] for t in cfg.layer_types) + sum(mlps)
    assert {"model.layers.0.linear_attn.in_proj_qkvz", "model.layers.0.linear_attn.in_proj_ba",
            "model.layers.1.mlp.shared_expert.down_proj", "model.layers.3.mlp.experts.5.up_proj",
            "model.layers.2.mlp.gate_proj"} <= set(adapted)
    assert not any(n.endswith(("shared_expert_gate", "mlp.gate", "conv1d", "lm_head")) for n in adapted)
    assert all(not p.requires_grad for n, m in model.named_modules() if isinstance(m, (TopKRouter, SharedExpertGate))
               for p in m.parameters())
    with pytest.raises(ValueError, match="the MoE router mlp.gate is not a linear layer"):
        lora.inject(load_ours(ckpt), targets=["gate"])


@pytest.mark.parametrize("rslora", [False, True])
def test_adapter_loads_in_peft_with_the_same_logits(ckpt, tmp_path, rslora):
    model = lora.inject(load_ours(ckpt), r=R, alpha=ALPHA, dropout=0.05, rslora=rslora)
    randomise_adapters(model, seed=7, std=STD)
    model.eval()
    lora.save(model, tmp_path / "adapter")

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == TARGET_MODULES and config["lora_dropout"] == 0.0
    assert config["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj", *MLP_PARAMETERS]
    assert config["alpha_pattern"][r".*\.gate_up_proj"] == pytest.approx(ALPHA * (2 ** 0.5 if rslora else 2))

    peft = peft_model(load_hf(ckpt), tmp_path / "adapter").eval()
    ids = random_ids(2, 70, seed=1)  # crosses the delta rule's 64-token chunk
    with torch.no_grad():
        ours, theirs = model(ids), peft(ids).logits
        with peft.disable_adapter():
            assert max_rel_err(ours, peft(ids).logits) > 0.1  # the adapter matters
        with lora.disable_adapters(model):
            assert max_rel_err(ours, model(ids)) > 0.1
        assert_close_to_reference(ours, theirs, float64_twin(peft)(ids).logits, what="PEFT logits")
    # back into this library: every module's own A and B again, the same logits
    again = lora.load(load_ours(ckpt), tmp_path / "adapter")
    assert sorted(lora.adapter_modules(again)) == sorted(lora.adapter_modules(model))
    with torch.no_grad():
        assert torch.equal(again(ids), ours)


def test_every_part_of_the_adapter_reaches_peft(ckpt, tmp_path):
    """Adapters on the shared expert and the dense MLP alone: PEFT applies them (it would drop them
    named as target_modules)."""
    model = lora.inject(load_ours(ckpt), r=R, alpha=ALPHA, targets=["shared_expert.up_proj", "mlp.down_proj"])
    randomise_adapters(model, seed=9, std=0.2)
    model.eval()
    lora.save(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == [] and config["target_parameters"] == [
        "mlp.down_proj.weight", "mlp.shared_expert.up_proj.weight"]
    peft = peft_model(load_hf(ckpt), tmp_path / "adapter").eval()
    ids = random_ids(2, 20, seed=2)
    with torch.no_grad():
        ours = model(ids)
        with lora.disable_adapters(model):
            assert max_rel_err(ours, model(ids)) > 1e-2
        assert_close_to_reference(ours, peft(ids).logits, float64_twin(peft)(ids).logits, what="PEFT logits")


def test_loss_and_gradients_match_peft(ckpt, tmp_path):
    """Through PEFT's fused-expert and weight wrappers and through per-module adapters."""
    training_matches_peft(ckpt, tmp_path)


def test_peft_trained_adapters_load(ckpt, tmp_path):
    """An adapter PEFT itself trained on transformers' model in this layout loads with its logits."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGET_MODULES,
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj", *MLP_PARAMETERS])
    peft = get_peft_model(load_hf(ckpt), config)
    randomise_adapters(peft, seed=5, std=STD)
    peft.save_pretrained(tmp_path / "peft")
    ours = lora.load(load_ours(ckpt), tmp_path / "peft")
    assert {"model.layers.0.mlp.shared_expert.gate_proj", "model.layers.2.mlp.up_proj"} <= set(lora.adapter_modules(ours))
    ids = random_ids(2, 33, seed=2)
    with torch.no_grad():
        peft.eval()
        assert_close_to_reference(ours(ids), peft(ids).logits, float64_twin(peft)(ids).logits, what="logits")


def test_qlora_experts_merge_into_the_16_bit_weights(ckpt, tmp_path):
    """NF4 routed and shared experts, dense MLP and linear-attention projections + LoRA: trains
    (adapters only), merges into the dequantised weights, and the same adapter merged into the
    original 16-bit weights gives PEFT's logits, unmerged and merged, on transformers' model."""
    from quant import NF4Linear

    q = load(ckpt, dtype=torch.float32, quantize=NF4Quantizer())
    lora.inject(q, r=R, alpha=ALPHA)
    layer = q.model.layers[0]
    assert isinstance(layer.mlp.experts[3].down_proj.base_layer, NF4Linear)
    assert isinstance(layer.mlp.shared_expert.up_proj.base_layer, NF4Linear)
    assert isinstance(layer.linear_attn.in_proj_qkvz.base_layer, NF4Linear)
    assert type(layer.mlp.shared_expert_gate) is SharedExpertGate  # 16-bit, no adapter
    randomise_adapters(q, seed=6, std=STD)
    merged, ids = train_save_and_merge(q, tmp_path / "adapter")
    assert isinstance(merged.model.layers[0].mlp.experts[3].down_proj, torch.nn.Linear)

    full = lora.merge(lora.load(load_ours(ckpt), tmp_path / "adapter"))
    peft = peft_model(load_hf(ckpt), tmp_path / "adapter").eval()
    with torch.no_grad():
        got = full(ids)
        floor_ref = float64_twin(peft)(ids).logits
        assert_close_to_reference(got, peft(ids).logits, floor_ref, what="PEFT logits")
        assert_close_to_reference(got, peft.merge_and_unload()(ids).logits, floor_ref, what="PEFT merged logits")


def test_peft_all_linear_router_adapter_is_refused_in_one_line(ckpt, tmp_path):
    """PEFT's own "all-linear" on transformers 5.25's Qwen3-Next adapts the router (target_parameters
    'gate.weight') and the shared_expert_gate, and leaves out the shared expert: this library never
    adapts the router, so it says so, naming the file and the entry, and loads nothing."""
    from peft import LoraConfig, get_peft_model

    from lora.config import AdapterError

    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear",
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    get_peft_model(load_hf(ckpt), config).save_pretrained(tmp_path / "peft")
    assert "gate.weight" in json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["target_parameters"]
    model = load_ours(ckpt)
    with pytest.raises(AdapterError, match=r"adapter_config\.json: target_parameters entry 'gate\.weight' is not "
                                           r"supported .*: a LoRA on the MoE router") as info:
        lora.load(model, tmp_path / "peft")
    assert "\n" not in str(info.value) and not lora.adapter_modules(model)
