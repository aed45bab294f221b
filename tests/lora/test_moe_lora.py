"""LoRA and QLoRA on Qwen3-MoE: every expert adapted one by one, the adapter in the published
per-expert layout loaded by PEFT onto transformers' fused Qwen3MoeForCausalLM (same logits, same
loss and gradients), unrouted experts, NF4 experts and merging (fp32, tiny random models)."""

import json
import re
import warnings

import pytest
import torch

import lora
from lora.config import AdapterError
from models.qwen import load
from models.qwen.moe import SparseMoeBlock, TopKRouter
from tests.helpers import hf_model, max_rel_err, random_ids, save_hf_model

R, ALPHA = 4, 8


@pytest.fixture
def pair(tmp_path):
    ref = hf_model("qwen3_moe")
    save_hf_model(ref, tmp_path / "ckpt")
    return ref, load(tmp_path / "ckpt", dtype=torch.float32)


def randomise_b(model, seed=1):
    """LoRA B starts at zero (a no-op adapter): give it values so the adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def peft_model(ref, adapter_dir, trainable=False):
    from peft import PeftModel

    with warnings.catch_warnings():  # PEFT's notes on its own MoE conversion (rank_pattern keys)
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(ref, adapter_dir, is_trainable=trainable)


def test_all_linear_adapts_every_expert_and_never_the_router(pair):
    _, ours = pair
    lora.inject(ours, r=R, alpha=ALPHA)
    adapted = lora.adapter_modules(ours)
    cfg = ours.config
    per_layer = 4 + 3 * cfg.num_experts  # q, k, v, o + gate/up/down of every expert
    assert len(adapted) == cfg.num_hidden_layers * per_layer
    assert all(isinstance(m, TopKRouter) and not m.weight.requires_grad
               for n, m in ours.named_modules() if n.endswith("mlp.gate"))
    assert ours.lora_config.target_modules == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                               "v_proj"]
    lora.merge(ours)
    with pytest.raises(ValueError, match="the MoE router mlp.gate is not a linear layer"):
        lora.inject(ours, targets=["gate"])


def test_adapter_loads_in_peft_with_the_same_logits(pair, tmp_path):
    ref, ours = pair
    lora.inject(ours, r=R, alpha=ALPHA, dropout=0.05)
    randomise_b(ours)
    lora.save(ours, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["lora_dropout"] == 0.0  # PEFT's fused-expert layer refuses dropout; inference ignores it
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.mlp.experts.5.up_proj.lora_B.weight" in keys

    peft = peft_model(ref, tmp_path / "adapter").eval()
    assert peft.peft_config["default"].target_parameters == {"gate_up_proj", "down_proj"}  # PEFT fused them
    ours.eval()
    ids = random_ids(2, 21)
    with torch.no_grad():
        got, want = ours(ids), peft(ids).logits
        assert max_rel_err(got, want) <= 1e-5
        with lora.disable_adapters(ours):
            assert max_rel_err(got, ours(ids)) > 0.1  # the adapter changes the logits

    # and back into this library: the same adapter, the same logits
    again = load(tmp_path / "ckpt", dtype=torch.float32)
    lora.load(again, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(again(ids), got)


def peft_lora_grads(peft) -> dict:
    """PEFT's LoRA gradients by our module names: per-expert slices of its fused A/B (see the
    layout in peft.utils.transformers_weight_conversion: A [E*r', in] expert-major, B [out, r'*E]
    expert-minor, r' = 2r for gate_up_proj whose B is block-diagonal over gate / up)."""
    out = {}
    for name, module in peft.named_modules():
        A = getattr(module, "lora_A", None)
        if not isinstance(A, torch.nn.ModuleDict) or "default" not in A:
            continue
        gA, gB = A["default"].weight.grad, module.lora_B["default"].weight.grad
        path = name.removeprefix("base_model.model.")
        kind = getattr(module, "parameter_name", None)
        if kind is None:  # a plain nn.Linear (attention)
            out[path] = (gA, gB)
            continue
        prefix = re.sub(r"(\.base_layer)+$", "", path)
        E = gA.shape[0] // R // (2 if kind == "gate_up_proj" else 1)
        gA = gA.reshape(E, -1, gA.shape[-1])
        gB = gB.reshape(gB.shape[0], -1, E)
        for e in range(E):
            if kind == "down_proj":
                out[f"{prefix}.{e}.down_proj"] = (gA[e], gB[:, :, e])
            else:
                I = gB.shape[0] // 2
                out[f"{prefix}.{e}.gate_proj"] = (gA[e, :R], gB[:I, :R, e])
                out[f"{prefix}.{e}.up_proj"] = (gA[e, R:], gB[I:, R:, e])
    return out


def test_loss_and_gradients_match_peft(pair, tmp_path):
    ref, ours = pair
    lora.inject(ours, r=R, alpha=ALPHA)
    randomise_b(ours)
    lora.save(ours, tmp_path / "adapter")
    peft = peft_model(ref, tmp_path / "adapter", trainable=True).train()
    ours.train()
    ids = random_ids(2, 25, seed=3)
    labels = ids.clone()
    labels[1, :9] = -100
    loss_peft = peft(ids, labels=labels).loss
    loss_ours = ours(ids, labels=labels)
    assert abs(loss_ours.item() - loss_peft.item()) <= 1e-5 * loss_peft.item()
    loss_peft.backward()
    loss_ours.backward()
    want = peft_lora_grads(peft)
    layers = lora.adapter_modules(ours)
    assert set(want) == set(layers)
    for name, layer in layers.items():
        gA, gB = want[name]
        if not gB.any():  # an expert no token reached: zero on both sides
            assert not layer.lora_B.weight.grad.any(), name
            continue
        assert max_rel_err(layer.lora_A.weight.grad, gA) <= 1e-4, name
        assert max_rel_err(layer.lora_B.weight.grad, gB) <= 1e-4, name


def test_unrouted_experts_get_zero_gradients(tmp_path):
    """An expert no token reached still gets a gradient (zeros), so the trainer's first-step check
    passes and DDP sees every parameter used; inference does not run it."""
    from train.guards import check_gradients_present

    ref = hf_model("qwen3_moe", num_experts_per_tok=1)
    save_hf_model(ref, tmp_path / "ckpt")
    ours = load(tmp_path / "ckpt", dtype=torch.float32)
    lora.inject(ours, r=R, alpha=ALPHA)
    ours.train()
    ids = random_ids(1, 3, seed=5)  # 3 tokens, one expert each: at least 3 of 6 experts idle per layer
    calls = []
    hooks = [e.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
             for b in ours.modules() if isinstance(b, SparseMoeBlock) for e in b.experts]
    ours(ids, labels=ids).backward()
    assert calls.count(0) >= 3 * ours.config.num_hidden_layers
    idle = [n for n, p in ours.named_parameters() if p.requires_grad and not p.grad.any() and "lora_A" in n]
    assert idle  # some experts were idle ...
    check_gradients_present(ours, step=1)  # ... and yet every trainable parameter has a gradient
    lora.check_gradients(ours)
    calls.clear()
    with torch.no_grad():
        ours(ids)
    assert 0 not in calls


def test_qlora_experts_merge_into_the_16_bit_weights(pair, tmp_path):
    """NF4 experts + LoRA: trains, merges (into the dequantised weights, and via the adapter into
    the original 16-bit ones), and the 16-bit merge equals PEFT's adapter on transformers' model."""
    from quant import NF4Linear

    ref, _ = pair
    q = load(tmp_path / "ckpt", dtype=torch.float32, quantize="nf4")
    lora.inject(q, r=R, alpha=ALPHA)
    expert = q.model.layers[0].mlp.experts[3].down_proj
    assert isinstance(expert, lora.LoRALinear) and isinstance(expert.base_layer, NF4Linear)
    randomise_b(q, seed=2)
    ids = random_ids(2, 17, seed=8)
    q.train()
    q(ids, labels=ids).backward()
    lora.check_gradients(q)
    q.eval()
    with torch.no_grad():
        adapted = q(ids)
        lora.save(q, tmp_path / "adapter")
        merged = lora.merge(q)
        assert max_rel_err(merged(ids), adapted) <= 1e-5
    assert isinstance(merged.model.layers[0].mlp.experts[3].down_proj, torch.nn.Linear)

    full = load(tmp_path / "ckpt", dtype=torch.float32)
    lora.merge(lora.load(full, tmp_path / "adapter"))
    peft = peft_model(ref, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert max_rel_err(full(ids), peft(ids).logits) <= 1e-5


def test_adapters_on_dense_layers_of_a_moe_model_warn_on_save(tmp_path):
    ref = hf_model("qwen3_moe", num_hidden_layers=3, mlp_only_layers=[1])
    save_hf_model(ref, tmp_path / "ckpt")
    ours = lora.inject(load(tmp_path / "ckpt", dtype=torch.float32), r=R, alpha=ALPHA)
    with pytest.warns(UserWarning, match=r"dense MLP layers of a mixture-of-experts model \(e.g. "
                                         r"'model.layers.1.mlp.gate_proj'\)"):
        lora.save(ours, tmp_path / "adapter")


def test_peft_fused_expert_adapters_are_refused(pair, tmp_path):
    """What PEFT writes when it trains the fused 3-D experts itself (target_parameters)."""
    from peft import LoraConfig, get_peft_model

    ref, ours = pair
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj"],
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    get_peft_model(ref, config).save_pretrained(tmp_path / "fused")
    with pytest.raises(AdapterError, match=r"adapter_config.json: target_parameters .* is not supported"):
        lora.load(ours, tmp_path / "fused")
