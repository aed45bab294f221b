"""Qwen3.5-MoE text models (Qwen3.5's hybrid Gated DeltaNet + gated attention layers, a routed +
shared-expert MoE block in every layer) against transformers' Qwen3_5MoeForCausalLM /
Qwen3_5MoeForConditionalGeneration on tiny random models (fp32, CPU): config both ways and the
parameter count, logits, loss and gradients (with and without the router's load-balancing loss),
greedy generation through the hybrid cache, the checkpoint layouts (per expert as save_pretrained
writes, fused and nested under model.language_model. as the published checkpoints are), save,
and the 4-bit load.

Logits agree to ~3e-7 of the largest (measured), also across the 64-token chunks of the delta
rule: as in test_qwen35.py, our chunked rule evaluates transformers' torch fallback in its order.
"""

from __future__ import annotations

import json

import pytest
import torch

from models.qwen import ConfigError, QwenConfig, generate, load, save
from models.qwen.moe import SharedExpertGate, SharedExpertMoeBlock, TopKRouter, collect_router_logits
from quant import NF4Quantizer
from tests.helpers import (assert_close_to_reference, assert_grads_match, assert_logits_match, float64_twin,
                           max_rel_err, random_ids)
from tests.models.test_moe import (cross_entropy_alone, fused_expert_grad, nf4_round_trip_decoder,
                                   train_step_with_aux_loss)
from tests.models.test_qwen35 import TINY_QWEN35, _randomise_small_parameters

pytestmark = [pytest.mark.filterwarnings("ignore:.*falling back to its reference PyTorch implementation"),
              pytest.mark.filterwarnings("ignore:.*written without tokenizer files")]

# Qwen3.5's tiny hybrid stack (see test_qwen35.py) with 6 experts of width 64, top 2, and a wider
# shared expert (128). Every linear's input width is a multiple of 64 (bitsandbytes' NF4 block).
TINY_QWEN35_MOE = dict({k: v for k, v in TINY_QWEN35.items() if k != "intermediate_size"},
                       num_experts=6, num_experts_per_tok=2, moe_intermediate_size=64,
                       shared_expert_intermediate_size=128)


def text_config(**overrides):
    from transformers import Qwen3_5MoeTextConfig

    return Qwen3_5MoeTextConfig(**{**TINY_QWEN35_MOE, **overrides})


@torch.no_grad()
def _randomise(model) -> None:
    """Qwen3.5's small parameters (norms, dt_bias, decay) randomised; the routers and shared-expert
    gates scaled up from HF's std 0.02, so that routing is decisive (no near-ties between the k-th
    and k+1-th expert) and sigmoid(gate) ranges over ~(0.1, 0.9) instead of sitting at 0.5."""
    _randomise_small_parameters(model)
    for name, p in model.named_parameters():
        if name.endswith(("mlp.gate.weight", "mlp.shared_expert_gate.weight")):
            p.mul_(10)


def hf_qwen35_moe(seed: int = 0, **overrides):
    """A tiny random transformers Qwen3_5MoeForCausalLM (fp32, eval)."""
    from transformers import Qwen3_5MoeForCausalLM

    torch.manual_seed(seed)
    model = Qwen3_5MoeForCausalLM(text_config(**overrides)).float().eval()
    _randomise(model)
    return model


def hf_qwen35_moe_multimodal(seed: int = 0, **overrides):
    """A tiny random Qwen3_5MoeForConditionalGeneration: the text model under model.language_model,
    beside a one-block vision tower (model.visual)."""
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    torch.manual_seed(seed)
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=64,
                  patch_size=4, temporal_patch_size=1, num_position_embeddings=16)
    config = Qwen3_5MoeConfig(text_config=text_config(**overrides).to_dict(), vision_config=vision,
                              tie_word_embeddings=overrides.get("tie_word_embeddings", False))
    model = Qwen3_5MoeForConditionalGeneration(config).float().eval()
    _randomise(model)
    return model


VARIANTS = {
    "untied": dict(tie_word_embeddings=False),
    "tied-bias-top3": dict(tie_word_embeddings=True, attention_bias=True, num_experts_per_tok=3),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    """(transformers, ours) of every variant, loaded from what save_pretrained wrote."""
    ref = hf_qwen35_moe(**VARIANTS[request.param])
    path = tmp_path_factory.mktemp("qwen35_moe") / "ckpt"
    ref.save_pretrained(path)
    return ref, load(path, dtype=torch.float32)


# ---------------------------------------------------------------------- config
def test_config_both_ways(tmp_path):
    """Read what transformers writes (text model, and the text_config of the multimodal one);
    what we write is a text-only config transformers reads as the same model."""
    from transformers import AutoConfig, Qwen3_5MoeConfig

    text_config(output_router_logits=True, router_aux_loss_coef=0.25).save_pretrained(tmp_path)
    cfg = QwenConfig.from_hf(tmp_path)
    assert (cfg.model_type, cfg.is_qwen35, cfg.num_experts, cfg.num_experts_per_tok) == ("qwen3_5_moe_text", True, 6, 2)
    assert (cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size, cfg.intermediate_size) == (64, 128, 0)
    assert cfg.norm_topk_prob and cfg.output_router_logits and cfg.router_aux_loss_coef == 0.25
    assert all(cfg.is_sparse_layer(i) for i in range(cfg.num_hidden_layers))
    assert cfg.layer_types == TINY_QWEN35["layer_types"] and cfg.rotary_dim == 4

    out = tmp_path / "ours"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(cfg.to_hf()))
    hf = AutoConfig.from_pretrained(out)
    assert type(hf).__name__ == "Qwen3_5MoeTextConfig" and cfg.to_hf()["architectures"] == ["Qwen3_5MoeForCausalLM"]
    for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
                "output_router_logits", "router_aux_loss_coef", "layer_types", "linear_num_value_heads"):
        assert getattr(hf, key) == getattr(cfg, key), key
    assert "intermediate_size" not in cfg.to_hf() and "norm_topk_prob" not in cfg.to_hf()
    assert QwenConfig.from_hf(out).to_hf() == cfg.to_hf()

    nested = tmp_path / "vl"
    Qwen3_5MoeConfig(text_config=text_config(tie_word_embeddings=True).to_dict()).save_pretrained(nested)
    raw = json.loads((nested / "config.json").read_text())
    raw["architectures"] = ["Qwen3_5MoeForConditionalGeneration"]
    (nested / "config.json").write_text(json.dumps(raw))
    vl = QwenConfig.from_hf(nested)
    assert (vl.model_type, vl.source_format, vl.num_experts, vl.shared_expert_intermediate_size) == (
        "qwen3_5_moe_text", "qwen3_5", 6, 128)


def test_keys_transformers_ignores_stay_unused(tmp_path):
    """Qwen3-Next-style keys (norm_topk_prob, decoder_sparse_step, mlp_only_layers, a dense width)
    mean nothing to Qwen3_5MoeForCausalLM: every layer sparse, top-k always renormalised. They are
    kept (written back as they came) and change nothing."""
    raw = text_config().to_dict()
    raw.update(norm_topk_prob=False, decoder_sparse_step=2, mlp_only_layers=[0], intermediate_size=512)
    cfg = QwenConfig.from_hf(raw)
    assert cfg.norm_topk_prob and cfg.decoder_sparse_step == 1 and cfg.mlp_only_layers == []
    assert all(cfg.is_sparse_layer(i) for i in range(3)) and cfg.intermediate_size == 0
    written = cfg.to_hf()
    assert (written["norm_topk_prob"], written["mlp_only_layers"], written["intermediate_size"]) == (False, [0], 512)


def test_config_errors_name_the_problem(tmp_path):
    base = text_config().to_dict()
    cases = [
        ({"shared_expert_intermediate_size": 0}, "shared_expert_intermediate_size = 0: model_type 'qwen3_5_moe_text' "
                                                 "needs a positive integer"),
        ({"num_experts": 0}, "model_type 'qwen3_5_moe_text' needs num_experts > 0"),
        ({"num_experts_per_tok": 7}, "num_experts_per_tok 7 must be between 1 and num_experts 6"),
        ({"num_experts": "6"}, r"num_experts = \"6\": expected an integer in \[0, "),
        ({"architectures": ["Qwen3_5ForCausalLM"]}, "expected 'Qwen3_5MoeForCausalLM'"),
    ]
    for change, message in cases:
        (tmp_path / "config.json").write_text(json.dumps({**base, **change}))
        with pytest.raises(ConfigError, match=message):
            QwenConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_5_moe", "text_config": []}))
    with pytest.raises(ConfigError, match="model_type 'qwen3_5_moe' needs a 'text_config' object"):
        QwenConfig.from_hf(tmp_path)
    with pytest.raises(ConfigError, match="every Qwen3.5-MoE layer is sparse"):
        QwenConfig(**{**TINY_QWEN35_MOE, "model_type": "qwen3_5_moe_text", "mlp_only_layers": [1]})
    with pytest.raises(ConfigError, match="shared_expert_intermediate_size 8 needs model_type 'qwen3_5_moe_text'"):
        QwenConfig(model_type="qwen3_moe", num_experts=4, shared_expert_intermediate_size=8)


def test_parameter_counts_match_transformers():
    """num_parameters against transformers' models: the tiny variants and, built on the meta
    device, Qwen3_5MoeTextConfig's defaults (Qwen3.5-35B-A3B's text model: 34.66B parameters).
    num_active_parameters: the total less the top-k-idle experts, counted from our own modules."""
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    from models.qwen import Qwen

    for kw in VARIANTS.values():
        cfg = QwenConfig.from_hf(text_config(**kw).to_dict())
        with torch.device("meta"):
            ref, ours = Qwen3_5MoeForCausalLM(text_config(**kw)), Qwen(cfg)
        assert cfg.num_parameters() == sum(p.numel() for p in ref.parameters()) == sum(p.numel() for p in ours.parameters())
        blocks = [m for m in ours.modules() if isinstance(m, SharedExpertMoeBlock)]
        assert len(blocks) == cfg.num_hidden_layers
        idle = sum(sum(p.numel() for p in b.experts[0].parameters()) * (cfg.num_experts - cfg.num_experts_per_tok)
                   for b in blocks)
        assert cfg.num_active_parameters() == cfg.num_parameters() - idle

    published = Qwen3_5MoeTextConfig()
    with torch.device("meta"):
        ref = Qwen3_5MoeForCausalLM(published)
    cfg = QwenConfig.from_hf(published.to_dict())
    assert cfg.num_parameters() == sum(p.numel() for p in ref.parameters()) == 34_660_610_688
    assert 3.4e9 < cfg.num_active_parameters() < 3.5e9  # "A3B"


# ---------------------------------------------------------------------- numerics
@pytest.mark.parametrize("length", [37, 150])
def test_logits_match_transformers(pair, length):
    ref, ours = pair
    ids = random_ids(2, length, seed=length)
    with torch.no_grad():
        assert_logits_match(ours(ids), ref, ids)


def test_block_is_routed_plus_gated_shared_expert(pair):
    """The MoE block alone, on random hidden states, against Qwen3_5MoeSparseMoeBlock; and the
    shared expert really is gated: without its gate the output moves."""
    ref, ours = pair
    x = torch.randn(2, 9, ours.config.hidden_size, generator=torch.Generator().manual_seed(0))
    mine, theirs = ours.model.layers[1].mlp, ref.model.layers[1].mlp
    assert isinstance(mine, SharedExpertMoeBlock) and isinstance(mine.shared_expert_gate, SharedExpertGate)
    with torch.no_grad():
        assert_close_to_reference(mine(x), theirs(x), float64_twin(theirs)(x.double()))
        gated = torch.sigmoid(mine.shared_expert_gate(x))
        assert gated.min() < 0.3 and gated.max() > 0.7  # (the fixture's gates are not all ~0.5)
        ungated = mine.routed(x.reshape(-1, x.shape[-1])).view_as(x) + mine.shared_expert(x)
        assert max_rel_err(ungated, theirs(x)) > 1e-2


def test_loss_and_gradients_match_transformers(pair):
    ref, ours = pair
    ref.train(), ours.train()
    ids = random_ids(2, 70, seed=1)  # two delta-rule chunks, the second partial
    labels = ids.clone()
    labels[0, :20] = -100
    ref.zero_grad(), ours.zero_grad()
    names = [n for n, _ in ours.named_parameters()]
    assert any(n.endswith("mlp.shared_expert_gate.weight") for n in names)
    assert any(n.endswith("mlp.experts.5.down_proj.weight") for n in names)
    # every parameter, routed experts against the fused gradients
    assert_grads_match(ours, ref, ids, labels=labels, ref_grad=fused_expert_grad)
    ref.zero_grad(), ours.zero_grad()
    ref.eval(), ours.eval()


@pytest.mark.parametrize("padded", [False, True])
def test_router_aux_loss_matches_transformers(tmp_path, padded):
    """output_router_logits: loss = CE + router_aux_loss_coef x load-balancing loss over every
    layer's router (padding left out), gradients included; in eval mode the cross-entropy alone."""
    ref = hf_qwen35_moe(seed=2, output_router_logits=True, router_aux_loss_coef=0.3)
    ref.save_pretrained(tmp_path)
    ours = load(tmp_path, dtype=torch.float32)
    ids, mask, labels, out, out64, _ = train_step_with_aux_loss(ref, ours, length=23, pad_from=15 if padded else None)
    ours.eval()
    with torch.no_grad(), collect_router_logits() as logits:
        assert_close_to_reference(ours(ids, labels=labels, attention_mask=mask), cross_entropy_alone(out, 0.3),
                                  cross_entropy_alone(out64, 0.3))
    assert len(logits) == 3  # every layer has a router


# ---------------------------------------------------------------------- generation
def test_greedy_generation_equals_transformers(pair):
    """Through the hybrid cache (conv + recurrent state on the linear layers, KV on the full one):
    a prefill across a chunk boundary, and a left-padded batch."""
    ref, ours = pair
    ids = random_ids(1, 70, seed=4)
    want = ref.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, eos_token_id=None,
                        pad_token_id=0)
    assert torch.equal(generate(ours, ids, max_new_tokens=12, eos_ids=[]), want)
    a, b = random_ids(1, 21, seed=5), random_ids(1, 13, seed=6)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 8, dtype=torch.long), b], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :8] = 0
    got = generate(ours, batch, max_new_tokens=10, eos_ids=[], attention_mask=mask, pad_id=0)
    want = ref.generate(batch, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False,
                        eos_token_id=None, pad_token_id=0)
    assert torch.equal(got, want)


# ---------------------------------------------------------------------- checkpoints
def test_save_writes_what_transformers_loads(pair, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ref, ours = pair
    save(ours, tmp_path / "out")
    keys = set(load_file(str(tmp_path / "out" / "model.safetensors")))
    assert {"model.layers.2.mlp.experts.5.down_proj.weight", "model.layers.2.mlp.shared_expert.up_proj.weight",
            "model.layers.2.mlp.shared_expert_gate.weight", "model.layers.2.mlp.gate.weight"} <= keys
    assert not any("gate_up_proj" in k for k in keys)  # per expert, as save_pretrained writes
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3_5MoeForCausalLM"] and config["model_type"] == "qwen3_5_moe_text"
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(back).__name__ == "Qwen3_5MoeForCausalLM"
    want = ref.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in back.state_dict().items())  # every tensor, to the bit
    ids = random_ids(2, 29, seed=9)
    with torch.no_grad():
        assert_logits_match(back(ids).logits, ref, ids)


def test_published_layout_loads_its_text_model(tmp_path):
    """A qwen3_5_moe checkpoint as published: the text model under model.language_model., its
    experts fused (gate_up_proj [E, 2I, H], down_proj [E, H, I]), a vision tower and an MTP head
    beside it. The text model loads (the rest left on disk), save() writes the whole checkpoint
    back, its experts per expert as save_pretrained writes them, which transformers loads with the
    same logits."""
    from safetensors.torch import save_file
    from transformers import Qwen3_5MoeForConditionalGeneration

    ref = hf_qwen35_moe_multimodal(seed=5, tie_word_embeddings=True)
    ref.save_pretrained(tmp_path / "vl")
    state = {k: v.contiguous() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    assert "model.language_model.layers.0.mlp.experts.gate_up_proj" in state
    state["mtp.layers.0.mlp.experts.0.gate_proj.weight"] = torch.randn(64, 64)  # the MTP head stores per expert
    for f in (tmp_path / "vl").glob("*.safetensors*"):
        f.unlink()
    save_file(state, str(tmp_path / "vl" / "model.safetensors"), metadata={"format": "pt"})
    ours = load(tmp_path / "vl", dtype=torch.float32)
    assert ours.config.source_format == "qwen3_5" and ours.is_tied
    ids = random_ids(2, 75, seed=8)
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        assert max_rel_err(ours(ids), want) <= 1e-5
    save(ours, tmp_path / "again")
    back = Qwen3_5MoeForConditionalGeneration.from_pretrained(tmp_path / "again", dtype=torch.float32).eval()
    with torch.no_grad():
        assert max_rel_err(back(input_ids=ids).logits, want) <= 1e-5
    # a wrong fused expert count is named
    state["model.language_model.layers.1.mlp.experts.down_proj"] = torch.zeros(5, 64, 64)
    save_file(state, str(tmp_path / "vl" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.experts.down_proj' has shape \(5, 64, 64\), "
                                         r"expected \(6, 64, 64\)"):
        load(tmp_path / "vl")


def test_nf4_load_quantises_every_expert_and_keeps_the_gates(tmp_path):
    """Streaming NF4 load: routed and shared experts, attention and linear-attention projections
    4-bit; the router and shared_expert_gate (one row each per layer) stay 16-bit. Logits: those of
    transformers' model with each of those weights replaced by its bitsandbytes NF4 round trip."""
    pytest.importorskip("bitsandbytes.functional")
    from quant import NF4Linear

    ref = hf_qwen35_moe(seed=3)
    ref.save_pretrained(tmp_path)
    q = load(tmp_path, dtype=torch.float32, quantize=NF4Quantizer())
    mlp = q.model.layers[0].mlp
    assert all(isinstance(getattr(e, p), NF4Linear) for e in [*mlp.experts, mlp.shared_expert]
               for p in ("gate_proj", "up_proj", "down_proj"))
    assert isinstance(q.model.layers[0].linear_attn.in_proj_qkv, NF4Linear)
    assert isinstance(mlp.gate, TopKRouter) and type(mlp.shared_expert_gate) is SharedExpertGate
    assert mlp.shared_expert_gate.weight.dtype == torch.float32

    nf4_round_trip_decoder(ref, keep=("shared_expert_gate",))
    with torch.no_grad():
        ids = random_ids(2, 19)
        assert_logits_match(q(ids), ref, ids)
