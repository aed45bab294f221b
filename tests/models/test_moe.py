"""Qwen3-MoE against transformers' Qwen3MoeForCausalLM on tiny random models (fp32): config,
logits, loss and gradients (with and without the router's load-balancing loss), both checkpoint
layouts, save, greedy generation, grouped expert dispatch and the 4-bit load."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.qwen import ConfigError, QwenConfig, generate, load, save
from models.qwen.moe import SparseMoeBlock, TopKRouter, collect_router_logits, load_balancing_loss
from quant import NF4Quantizer
from tests.helpers import (assert_close_to_reference, assert_grads_match, assert_logits_match, hf_config, hf_model,
                           random_ids, save_hf_model)

VARIANTS = {
    "renormalised": dict(),
    "raw-topk": dict(norm_topk_prob=False, tie_word_embeddings=True),
    # layer 1 dense by mlp_only_layers, layers 0 and 2 off the sparse grid (step 2): only 3 sparse
    "dense-layers": dict(num_hidden_layers=4, mlp_only_layers=[1], decoder_sparse_step=2),
}


def make_pair(path, variant):
    ref = hf_model("qwen3_moe", **VARIANTS[variant])
    save_hf_model(ref, path)
    return ref, load(path, dtype=torch.float32)


@pytest.fixture(params=sorted(VARIANTS))
def pair(request, tmp_path):
    """(transformers, ours) of every variant: for the numerics."""
    return make_pair(tmp_path / "ckpt", request.param)


@pytest.fixture
def mixed(tmp_path):
    """(transformers, ours) with dense and sparse layers: for the rest."""
    return make_pair(tmp_path / "ckpt", "dense-layers")


# ---------------------------------------------------------------------- config
def test_config_from_what_transformers_writes_and_what_is_published(tmp_path):
    from transformers import AutoConfig

    ref = hf_config("qwen3_moe", mlp_only_layers=[0], decoder_sparse_step=2, num_hidden_layers=4)
    ref.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert "num_local_experts" in written and "num_experts" not in written  # transformers 5's spelling
    cfg = QwenConfig.from_hf(tmp_path)
    assert (cfg.model_type, cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (
        "qwen3_moe", ref.num_experts, ref.num_experts_per_tok, ref.moe_intermediate_size)
    assert cfg.norm_topk_prob is True and cfg.qk_norm and not cfg.attention_bias
    assert [cfg.is_sparse_layer(i) for i in range(4)] == [False, True, False, True]

    # The published Qwen3-30B-A3B config.json spells it num_experts; our to_hf writes the same.
    published = QwenConfig.preset("qwen3-30b-a3b").to_hf()
    assert published["num_experts"] == 128 and "num_local_experts" not in published
    (tmp_path / "config.json").write_text(json.dumps(published))
    hf = AutoConfig.from_pretrained(tmp_path)
    assert (hf.model_type, hf.num_experts, hf.num_experts_per_tok, hf.norm_topk_prob) == ("qwen3_moe", 128, 8, True)
    assert QwenConfig.from_hf(tmp_path).to_hf() == published
    # 30.5B parameters, 3.3B active (the model card)
    cfg = QwenConfig.preset("qwen3-30b-a3b")
    assert abs(cfg.num_parameters() / 1e9 - 30.5) < 0.05 and abs(cfg.num_active_parameters() / 1e9 - 3.3) < 0.06


def test_config_errors_name_the_problem(tmp_path):
    base = hf_config("qwen3_moe").to_dict()
    cases = [
        ({"num_local_experts": None, "num_experts": None}, "needs 'num_experts'"),
        ({"mlp_only_layers": [5]}, r"mlp_only_layers holds 5: expected layer indices in \[0, 2\)"),
        ({"num_experts_per_tok": 7}, "num_experts_per_tok 7 must be between 1 and num_experts 6"),
        ({"model_type": "qwen2_moe"}, "model_type 'qwen2_moe' is not supported"),
        ({"architectures": ["Qwen3ForCausalLM"]}, "expected 'Qwen3MoeForCausalLM'"),
    ]
    for change, message in cases:
        raw = {**base, **change}
        (tmp_path / "config.json").write_text(json.dumps(raw))
        with pytest.raises(ConfigError, match=message):
            QwenConfig.from_hf(tmp_path)


# ---------------------------------------------------------------------- numerics
def test_logits_match_transformers(pair):
    ref, ours = pair
    ids = random_ids(3, 29)
    with torch.no_grad():
        assert_logits_match(ours(ids), ref, ids)


def test_loss_and_gradients_match_transformers(pair):
    ref, ours = pair
    ref.train(), ours.train()
    ids = random_ids(2, 21, seed=1)
    labels = ids.clone()
    labels[0, :7] = -100
    assert_grads_match(ours, ref, ids, labels=labels, ref_grad=fused_expert_grad)


def fused_expert_grad(model, name: str):
    """The gradient in transformers' `model` of our parameter `name`: a routed expert's
    projection is a slice of the layer's fused expert tensors, anything else has our name."""
    if ".experts." not in name:
        return model.get_parameter(name).grad
    prefix, e, proj, _ = name.rsplit(".", 3)
    fused = model.get_parameter(f"{prefix}.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}").grad
    if fused is None:
        return None
    I = model.config.moe_intermediate_size
    return {"gate_proj": fused[int(e), :I], "up_proj": fused[int(e), I:], "down_proj": fused[int(e)]}[proj]


def train_step_with_aux_loss(ref, ours, length: int, pad_from=None):
    """One training-mode forward + backward of both models on the same batch (row 1 right-padded
    from `pad_from`); checks the balance term is there, the losses and every gradient agree.
    Returns (ids, mask, labels, transformers' output, its float64 twin's, our loss)."""
    ref.train(), ours.train()
    ids = random_ids(2, length, seed=4)
    mask = torch.ones_like(ids)
    if pad_from is not None:
        mask[1, pad_from:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    loss_ours, out, out64 = assert_grads_match(ours, ref, ids, labels=labels, attention_mask=mask,
                                               ref_grad=fused_expert_grad)
    assert out.aux_loss > 1.0  # the balance term is really there (1 = perfectly balanced)
    return ids, mask, labels, out, out64, loss_ours


def cross_entropy_alone(out, coef: float) -> torch.Tensor:
    """transformers' training loss minus its balance term: the eval-mode loss."""
    return (out.loss - coef * out.aux_loss).detach()


@pytest.mark.parametrize("padded", [False, True])
def test_router_aux_loss_matches_transformers(tmp_path, padded):
    """output_router_logits: loss = CE + router_aux_loss_coef x load-balancing loss, with its
    gradient into the routers; padding (attention_mask 0) is left out of the balance."""
    ref = hf_model("qwen3_moe", output_router_logits=True, router_aux_loss_coef=0.3, num_hidden_layers=3)
    save_hf_model(ref, tmp_path / "ckpt")
    ours = load(tmp_path / "ckpt", dtype=torch.float32)
    assert ours.config.output_router_logits and ours.config.router_aux_loss_coef == 0.3
    ids, mask, labels, out, out64, loss_ours = train_step_with_aux_loss(ref, ours, length=17,
                                                                        pad_from=12 if padded else None)
    # reduction="sum": the aux term weighted by the supervised tokens (sum / n = the mean loss)
    loss_sum, n = ours(ids, labels=labels, attention_mask=mask, reduction="sum")
    assert torch.allclose(loss_sum / n, loss_ours, rtol=1e-6)  # one division apart: a few ulps (2**-23)
    # eval mode (perplexity): the cross-entropy alone
    ours.eval()
    with torch.no_grad():
        assert_close_to_reference(ours(ids, labels=labels, attention_mask=mask), cross_entropy_alone(out, 0.3),
                                  cross_entropy_alone(out64, 0.3))
    # the same function on logits collected by hand, and transformers' own function
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    with torch.no_grad(), collect_router_logits() as logits:
        ours(ids, attention_mask=mask)
    assert len(logits) == 3
    want = load_balancing_loss_func(tuple(logits), 6, 2, mask)
    assert torch.allclose(load_balancing_loss(logits, 6, 2, mask), want, rtol=1e-6)


def test_grouped_dispatch_runs_each_expert_once(mixed):
    """One call per expert that tokens reached (its rows batched), none for the others."""
    _, ours = mixed
    calls = {}
    hooks = [expert.register_forward_hook(lambda m, args, out, key=(i, e): calls.setdefault(key, []).append(
        args[0].shape[0])) for i, layer in enumerate(ours.model.layers) if isinstance(layer.mlp, SparseMoeBlock)
        for e, expert in enumerate(layer.mlp.experts)]
    ids = random_ids(2, 40, seed=2)
    with torch.no_grad():
        ours(ids)
    for h in hooks:
        h.remove()
    assert all(len(rows) == 1 and rows[0] > 0 for rows in calls.values())
    sparse = sum(isinstance(layer.mlp, SparseMoeBlock) for layer in ours.model.layers)
    assert sum(rows[0] for rows in calls.values()) == sparse * 80 * 2  # every (token, slot) once


def test_router_stays_out_of_the_linears(mixed):
    _, ours = mixed
    routers = [m for m in ours.modules() if isinstance(m, TopKRouter)]
    assert routers and not any(isinstance(m, torch.nn.Linear) for m in routers)


# ---------------------------------------------------------------------- checkpoints
def test_fused_layout_loads_like_the_per_expert_one(mixed, tmp_path):
    """transformers' in-memory state dict (fused gate_up_proj / down_proj), saved as it is."""
    ref, ours = mixed
    state = {k: v.contiguous() for k, v in ref.state_dict().items()
             if not (k == "lm_head.weight" and ref.config.tie_word_embeddings)}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    ref.config.save_pretrained(tmp_path)
    fused = load(tmp_path, dtype=torch.float32)
    ids = random_ids(2, 19)
    with torch.no_grad():
        assert torch.equal(fused(ids), ours(ids))
    # a wrong expert count is a clear error naming the tensor
    state[next(k for k in state if k.endswith("gate_up_proj"))] = torch.zeros(5, 48, 48)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"mlp.experts.gate_up_proj' has shape \(5, 48, 48\), expected \(6, 48, 48\)"):
        load(tmp_path)


def test_save_writes_the_published_layout(mixed, tmp_path):
    from transformers import AutoModelForCausalLM

    ref, ours = mixed
    save(ours, tmp_path / "out")
    keys = set(load_file(str(tmp_path / "out" / "model.safetensors")))
    sparse = next(i for i in range(ours.config.num_hidden_layers) if ours.config.is_sparse_layer(i))
    assert f"model.layers.{sparse}.mlp.experts.5.down_proj.weight" in keys
    assert f"model.layers.{sparse}.mlp.gate.weight" in keys
    assert not any("gate_up_proj" in k for k in keys)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"] and config["num_experts"] == 6
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = random_ids(2, 23)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ref(ids).logits)


# ---------------------------------------------------------------------- generation
def test_greedy_generation_equals_transformers(mixed):
    ref, ours = mixed
    prompt = random_ids(1, 11, seed=6)
    want = ref.generate(prompt, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(generate(ours, prompt, max_new_tokens=16, temperature=0.0, eos_ids=[]), want)
    # a left-padded batch continues each row as the row alone does
    short = random_ids(1, 6, seed=7)
    batch = torch.cat([prompt, torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    got = generate(ours, batch, max_new_tokens=8, temperature=0.0, eos_ids=[], attention_mask=mask)
    assert torch.equal(got[1, 11:], generate(ours, short, max_new_tokens=8, temperature=0.0, eos_ids=[])[0, 6:])


# ---------------------------------------------------------------------- 4-bit
@torch.no_grad()
def nf4_round_trip_decoder(ref, keep: tuple[str, ...] = ()) -> None:
    """Replace, in transformers' MoE model `ref`, each decoder-layer linear weight (but those whose
    name ends with an entry of `keep`) and each expert's gate, up and down rows of its fused
    tensors (3 linears on disk) by bitsandbytes' own NF4 round trip (blocks of 64, double quant)."""
    import bitsandbytes.functional as bnbf

    def nf4_round_trip(w):
        packed, state = bnbf.quantize_4bit(w.contiguous(), blocksize=64, quant_type="nf4", compress_statistics=True)
        return bnbf.dequantize_4bit(packed, state)

    I = ref.config.moe_intermediate_size
    with torch.compiler.set_stance("force_eager"):
        for name, module in ref.named_modules():
            if name.endswith("mlp.experts"):
                for e in range(ref.config.num_experts):
                    module.gate_up_proj[e, :I] = nf4_round_trip(module.gate_up_proj[e, :I])
                    module.gate_up_proj[e, I:] = nf4_round_trip(module.gate_up_proj[e, I:])
                    module.down_proj[e] = nf4_round_trip(module.down_proj[e])
            elif isinstance(module, torch.nn.Linear) and name.startswith("model.layers.") and not name.endswith(keep):
                module.weight.copy_(nf4_round_trip(module.weight))


def test_nf4_load_quantises_experts_and_keeps_the_router(tmp_path):
    """Streaming NF4 load: every expert projection 4-bit, router 16-bit; the logits are those of
    transformers' model with each linear weight replaced by its bitsandbytes NF4 round trip."""
    pytest.importorskip("bitsandbytes.functional")
    from quant import NF4Linear

    # Every input width a multiple of the block size (64): bitsandbytes' CPU dequantisation is
    # wrong otherwise (tests/quant/test_codec.py::test_bnb_cpu_dequant_bug_documented).
    ref = hf_model("qwen3_moe", hidden_size=64, head_dim=16, intermediate_size=128, moe_intermediate_size=64,
                   mlp_only_layers=[0])
    save_hf_model(ref, tmp_path / "ckpt")
    q = load(tmp_path / "ckpt", dtype=torch.float32, quantize=NF4Quantizer())
    mlp = q.model.layers[1].mlp
    assert all(isinstance(getattr(e, p), NF4Linear) for e in mlp.experts for p in ("gate_proj", "up_proj", "down_proj"))
    assert isinstance(q.model.layers[0].mlp.gate_proj, NF4Linear)
    assert type(mlp.gate.weight) is torch.nn.Parameter and mlp.gate.weight.dtype == torch.float32

    nf4_round_trip_decoder(ref)
    with torch.no_grad():
        ids = random_ids(2, 19)
        assert_logits_match(q(ids), ref, ids)
