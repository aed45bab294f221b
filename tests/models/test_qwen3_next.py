"""Qwen3-Next (`qwen3_next`) against transformers' Qwen3NextForCausalLM on tiny random models
(fp32, CPU): config both ways and the parameter count, the fused Gated DeltaNet projections
(in_proj_qkvz / in_proj_ba, interleaved per key head), logits, loss and gradients of every
parameter (with and without the router's load-balancing loss), greedy decoding across a
delta-rule chunk boundary, the checkpoint layouts (per expert as save_pretrained writes, fused
as transformers holds them in memory, with an MTP head beside them), save, and the 4-bit load.

Tolerances are measured, not guessed: the reference's own error is taken by running its float64
twin on the same weights and inputs (`tests.helpers.reference_floor`), and ours may be a few of those floors
from the fp32 reference (FLOOR_FACTOR). Measured on this model (37 and 150 tokens): transformers'
fp32 logits are 2.9-3.8e-7 (of the largest logit) from its float64 twin, ours 1.9-3.5e-7 from its
fp32 ones, within one floor; swapping v and z in the split of in_proj_qkvz, or renormalising the
top-k where norm_topk_prob is false, fails these tests by orders of magnitude.
"""

from __future__ import annotations

import json

import pytest
import torch

from models.qwen import ConfigError, Qwen, QwenConfig, load, save
from models.qwen.moe import SharedExpertGate, SharedExpertMoeBlock, TopKRouter
from models.qwen.families.qwen3_next import FusedGatedDeltaNet
from quant import NF4Quantizer
from tests.helpers import assert_close_to_reference, assert_grads_close, float64_twin, random_ids
from tests.models.test_moe import nf4_round_trip_decoder
from tests.models.test_qwen35 import _randomise_small_parameters

pytestmark = [pytest.mark.filterwarnings("ignore:.*falling back to its reference PyTorch implementation"),
              pytest.mark.filterwarnings("ignore:.*written without tokenizer files")]

# Four layers: linear, full, linear, linear attention; layer 2 is in mlp_only_layers (a dense MLP
# of intermediate_size), the others route over 6 experts of width 64 (top 2) plus a wider shared
# expert (128). Grouped value heads (4 over 2 key heads) of another width than the keys, so a
# split of in_proj_qkvz that ignores the per-key-head interleave is wrong. head_dim 16 with
# partial_rotary_factor 0.25 rotates 4 dims. Input widths are multiples of 64 (NF4 blocks).
TINY_NEXT = dict(
    vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"],
    linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=16,
    linear_num_key_heads=2, linear_num_value_heads=4, max_position_embeddings=512,
    num_experts=6, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=128,
    mlp_only_layers=[2],
)
VARIANTS = {
    "untied-renormalised": dict(tie_word_embeddings=False),
    "tied-bias-top3-raw-topk": dict(tie_word_embeddings=True, attention_bias=True, num_experts_per_tok=3,
                                    norm_topk_prob=False),
}

# config.json of Qwen/Qwen3-Next-80B-A3B-Instruct as published (transformers 4.57's spelling: rope_theta,
# partial_rotary_factor and full_attention_interval at the top level, rope_scaling null).
PUBLISHED = {
    "architectures": ["Qwen3NextForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
    "decoder_sparse_step": 1, "eos_token_id": 151645, "full_attention_interval": 4, "head_dim": 256, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 5120, "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 128, "linear_num_key_heads": 16, "linear_num_value_heads": 32, "linear_value_head_dim": 128,
    "max_position_embeddings": 262144, "mlp_only_layers": [], "model_type": "qwen3_next", "moe_intermediate_size": 512,
    "norm_topk_prob": True, "num_attention_heads": 16, "num_experts": 512, "num_experts_per_tok": 10,
    "num_hidden_layers": 48, "num_key_value_heads": 2, "output_router_logits": False, "partial_rotary_factor": 0.25,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000000, "router_aux_loss_coef": 0.001,
    "shared_expert_intermediate_size": 512, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.57.0.dev0", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}

def hf_config(**overrides):
    from transformers import Qwen3NextConfig

    return Qwen3NextConfig(**{**TINY_NEXT, **overrides})


@torch.no_grad()
def _randomise(model) -> None:
    """Norms, biases, dt_bias and decays randomised (see test_qwen35.py); routers and shared-expert
    gates scaled up from HF's std 0.02, so routing is decisive and sigmoid(gate) spreads over (0, 1)."""
    _randomise_small_parameters(model)
    for name, p in model.named_parameters():
        if name.endswith(("mlp.gate.weight", "mlp.shared_expert_gate.weight")):
            p.mul_(10)


def hf_qwen3_next(seed: int = 0, **overrides):
    """A tiny random transformers Qwen3NextForCausalLM (fp32, eval)."""
    from transformers import Qwen3NextForCausalLM

    torch.manual_seed(seed)
    model = Qwen3NextForCausalLM(hf_config(**overrides)).float().eval()
    _randomise(model)
    return model


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    """(transformers, its float64 twin, ours loaded from what save_pretrained wrote)."""
    ref = hf_qwen3_next(**VARIANTS[request.param])
    path = tmp_path_factory.mktemp("qwen3_next") / "ckpt"
    ref.save_pretrained(path)
    return ref, float64_twin(ref), load(path, dtype=torch.float32)


# ---------------------------------------------------------------------- config
def test_config_both_ways(tmp_path):
    """Read what transformers writes; what we write transformers reads as the same model, and it
    reads back to the same config."""
    from transformers import AutoConfig

    hf_config(output_router_logits=True, router_aux_loss_coef=0.25, norm_topk_prob=False,
              decoder_sparse_step=1).save_pretrained(tmp_path)
    cfg = QwenConfig.from_hf(tmp_path)
    assert (cfg.model_type, cfg.is_qwen35, cfg.num_experts, cfg.num_experts_per_tok) == ("qwen3_next", True, 6, 2)
    assert (cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size, cfg.intermediate_size) == (64, 128, 128)
    assert not cfg.norm_topk_prob and cfg.output_router_logits and cfg.router_aux_loss_coef == 0.25
    assert [cfg.is_sparse_layer(i) for i in range(4)] == [True, True, False, True]
    assert cfg.layer_types == TINY_NEXT["layer_types"] and cfg.rotary_dim == 4 and cfg.qk_norm

    out = tmp_path / "ours"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(cfg.to_hf()))
    hf = AutoConfig.from_pretrained(out)
    assert type(hf).__name__ == "Qwen3NextConfig" and cfg.to_hf()["architectures"] == ["Qwen3NextForCausalLM"]
    for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
                "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "output_router_logits",
                "router_aux_loss_coef", "layer_types", "intermediate_size", "head_dim", "linear_num_value_heads",
                "linear_key_head_dim", "attention_bias"):
        assert getattr(hf, key) == getattr(cfg, key), key
    assert hf.rope_parameters["partial_rotary_factor"] == 0.25 and hf.rope_parameters["rope_theta"] == cfg.rope_theta
    assert QwenConfig.from_hf(out).to_hf() == cfg.to_hf()


def test_config_read_as_transformers_reads_it():
    """The published config.json spelling (v4: rope_theta, partial_rotary_factor, rope_scaling null,
    full_attention_interval, no layer_types), and the v5 one where rope_parameters' factor wins."""
    from transformers import Qwen3NextConfig

    raw = {k: v for k, v in TINY_NEXT.items() if k != "layer_types"}
    raw.update(model_type="qwen3_next", architectures=["Qwen3NextForCausalLM"], rope_theta=1e7,
               partial_rotary_factor=0.5, rope_scaling=None, full_attention_interval=2)
    cases = [raw, {**raw, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.25}},
             {k: v for k, v in raw.items() if k not in ("partial_rotary_factor", "rope_theta")}]
    for case in cases:
        ours, theirs = QwenConfig.from_hf(case), Qwen3NextConfig(**case)
        assert ours.layer_types == theirs.layer_types
        assert ours.partial_rotary_factor == theirs.rope_parameters["partial_rotary_factor"]
        assert ours.rope_theta == theirs.rope_parameters["rope_theta"]
    assert QwenConfig.from_hf(cases[0]).layer_types == ["linear_attention", "full_attention"] * 2


def test_config_errors_name_the_problem(tmp_path):
    base = hf_config().to_dict()
    cases = [
        ({"shared_expert_intermediate_size": 0}, "shared_expert_intermediate_size = 0: model_type 'qwen3_next' "
                                                 "needs a positive integer"),
        ({"num_experts": 0}, "model_type 'qwen3_next' needs num_experts > 0"),
        ({"num_experts_per_tok": 7}, "num_experts_per_tok 7 must be between 1 and num_experts 6"),
        ({"num_experts": "6"}, r'config\.json: num_experts = "6": expected an integer'),
        ({"mlp_only_layers": [4]}, r"mlp_only_layers holds 4: expected layer indices in \[0, 4\)"),
        ({"architectures": ["Qwen3_5MoeForCausalLM"]}, "expected 'Qwen3NextForCausalLM'"),
        ({"layer_types": ["linear_attention"] * 3}, "layer_types has 3 entries, expected num_hidden_layers=4"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}}, "dynamic"),
    ]
    for change, message in cases:
        (tmp_path / "config.json").write_text(json.dumps({**base, **change}))
        with pytest.raises(ConfigError, match=message) as info:
            QwenConfig.from_hf(tmp_path)
        assert str(info.value).startswith(str(tmp_path / "config.json"))


def test_parameter_counts_match_transformers():
    """num_parameters against transformers' models: the tiny variants and, built on the meta
    device, Qwen3-Next-80B-A3B's config.json (79.67B parameters, 3.87B active)."""
    from transformers import Qwen3NextForCausalLM

    for kw in VARIANTS.values():
        cfg = QwenConfig.from_hf(hf_config(**kw).to_dict())
        with torch.device("meta"):
            ref, ours = Qwen3NextForCausalLM(hf_config(**kw)), Qwen(cfg)
        assert cfg.num_parameters() == sum(p.numel() for p in ref.parameters()) == sum(p.numel() for p in ours.parameters())
        blocks = [m for m in ours.modules() if isinstance(m, SharedExpertMoeBlock)]
        assert len(blocks) == 3  # layer 2 is dense
        idle = sum(sum(p.numel() for p in b.experts[0].parameters()) * (cfg.num_experts - cfg.num_experts_per_tok)
                   for b in blocks)
        assert cfg.num_active_parameters() == cfg.num_parameters() - idle

    from transformers import Qwen3NextConfig

    cfg = QwenConfig.from_hf(PUBLISHED)
    with torch.device("meta"):
        ref = Qwen3NextForCausalLM(Qwen3NextConfig.from_dict(PUBLISHED))
    assert cfg.num_parameters() == sum(p.numel() for p in ref.parameters()) == 79_674_391_296
    assert cfg.num_active_parameters() == 3_874_929_408  # "A3B": 10 of 512 experts + the shared one
    assert (cfg.rope_theta, cfg.rotary_dim, cfg.layer_types[:4]) == (1e7, 64, ["linear_attention"] * 3 + ["full_attention"])


# ---------------------------------------------------------------------- numerics
def test_fused_projection_split_is_transformers_ordering(pair):
    """FusedGatedDeltaNet.project against Qwen3NextGatedDeltaNet.fix_query_key_value_ordering on
    the same layer: q, k, v (head-major, value head h*g + j), z, b and a, bit for bit."""
    ref, _, ours = pair
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    mine, theirs = ours.model.layers[0].linear_attn, ref.model.layers[0].linear_attn
    assert isinstance(mine, FusedGatedDeltaNet) and not hasattr(mine, "in_proj_qkv")
    with torch.no_grad():
        qkv, z, b, a = mine.project(x)
        q, k, v, z_ref, b_ref, a_ref = theirs.fix_query_key_value_ordering(theirs.in_proj_qkvz(x), theirs.in_proj_ba(x))
    want = torch.cat([t.reshape(2, 5, -1) for t in (q, k, v)], dim=-1)
    assert torch.equal(qkv, want) and torch.equal(z, z_ref) and torch.equal(b, b_ref) and torch.equal(a, a_ref)


@pytest.mark.parametrize("length", [37, 150])
def test_logits_match_transformers(pair, length):
    """Inside one 64-token chunk of the delta rule and across three."""
    ref, twin, ours = pair
    ids = random_ids(2, length, seed=length)
    with torch.no_grad():
        assert_close_to_reference(ours(ids), ref(ids).logits, twin(ids).logits, what="logits")


def test_yarn_with_partial_rotary_matches_transformers(tmp_path):
    """Qwen3-Next's long-context setting: YaRN over the rotated quarter of each head (here half, of
    head_dim 16). Logits and the config written back, which transformers reads as the same RoPE."""
    from transformers import AutoConfig

    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5}
    ref = hf_qwen3_next(seed=6, rope_parameters=rope)
    ref.save_pretrained(tmp_path / "hf")
    ours = load(tmp_path / "hf", dtype=torch.float32)
    assert ours.config.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}
    assert ours.config.rotary_dim == 8
    ids = random_ids(1, 150, seed=2)  # past original_max_position_embeddings
    with torch.no_grad():
        assert_close_to_reference(ours(ids), ref(ids).logits, float64_twin(ref)(ids).logits, what="yarn logits")
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "config.json").write_text(json.dumps(ours.config.to_hf()))
    assert AutoConfig.from_pretrained(tmp_path / "ours").rope_parameters == rope


def test_block_is_routed_plus_gated_shared_expert(pair):
    ref, twin, ours = pair
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(0))
    mine, theirs = ours.model.layers[1].mlp, ref.model.layers[1].mlp
    assert isinstance(mine, SharedExpertMoeBlock) and isinstance(mine.shared_expert_gate, SharedExpertGate)
    assert type(ours.model.layers[2].mlp).__name__ == "SwiGLU"  # mlp_only_layers
    with torch.no_grad():
        assert_close_to_reference(mine(x), theirs(x), twin.model.layers[1].mlp(x.double()), what="moe block")
        gated = torch.sigmoid(mine.shared_expert_gate(x))
        assert gated.min() < 0.3 and gated.max() > 0.7  # (the fixture's gates are not all ~0.5)


def _fused_grad(model, name: str):
    """The gradient in `model` (transformers or its twin) of our parameter `name`: a routed
    expert's rows of transformers' fused gate_up_proj / down_proj gradient."""
    if ".experts." not in name:
        return model.get_parameter(name).grad
    I = model.config.moe_intermediate_size
    prefix, e, proj, _ = name.rsplit(".", 3)
    fused = model.get_parameter(f"{prefix}.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}").grad
    rows = {"gate_proj": slice(0, I), "up_proj": slice(I, None), "down_proj": slice(None)}[proj]
    return fused[int(e)][rows]


def _grads_against_reference(ref, twin, ours, loss_of) -> None:
    """Loss and every parameter's gradient of ours within FLOOR_FACTOR floors of transformers'
    (tests.helpers.assert_grads_close; the routed experts against its fused gradients)."""
    losses = [loss_of(m) for m in (ours, ref, twin)]
    for m, loss in zip((ours, ref, twin), losses):
        m.zero_grad()
        loss.backward()
    assert_close_to_reference(*(loss.detach() for loss in losses), what="loss")
    assert_grads_close(ours, ref, twin, _fused_grad)
    reached = sum(1 for name, _ in ours.named_parameters() if _fused_grad(ref, name) is not None
                  and _fused_grad(ref, name).any())
    assert reached > 0.9 * len(list(ours.parameters()))


def test_loss_and_gradients_match_transformers(pair):
    ref, twin, ours = pair
    ids = random_ids(2, 70, seed=1)  # two delta-rule chunks, the second partial
    labels = ids.clone()
    labels[0, :20] = -100
    for m in (ref, twin, ours):
        m.train()
    try:
        _grads_against_reference(ref, twin, ours, lambda m: m(ids, labels=labels).loss if m is not ours
                                 else m(ids, labels=labels))
        names = [n for n, _ in ours.named_parameters()]
        assert {"model.layers.0.linear_attn.in_proj_qkvz.weight", "model.layers.0.linear_attn.in_proj_ba.weight",
                "model.layers.1.mlp.shared_expert_gate.weight", "model.layers.3.mlp.experts.5.down_proj.weight",
                "model.layers.2.mlp.down_proj.weight"} <= set(names)
    finally:
        for m in (ref, twin, ours):
            m.zero_grad()
            m.eval()


@pytest.mark.parametrize("padded", [False, True])
def test_router_aux_loss_matches_transformers(tmp_path, padded):
    """output_router_logits, in training mode: loss = CE + router_aux_loss_coef x load-balancing loss
    over the routers of the sparse layers (padding left out), every gradient included; in eval mode
    the cross-entropy alone."""
    ref = hf_qwen3_next(seed=2, output_router_logits=True, router_aux_loss_coef=0.3, norm_topk_prob=False)
    ref.save_pretrained(tmp_path)
    ours, twin = load(tmp_path, dtype=torch.float32), float64_twin(ref)
    ids = random_ids(2, 23, seed=4)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, 15:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    for m in (ref, twin, ours):
        m.train()
    out = ref(ids, labels=labels, attention_mask=mask)
    assert out.aux_loss > 1.0  # the balance term is really there (1 = perfectly balanced)
    _grads_against_reference(ref, twin, ours, lambda m: m(ids, labels=labels, attention_mask=mask) if m is ours
                             else m(ids, labels=labels, attention_mask=mask).loss)
    ours.eval()
    with torch.no_grad():
        ce, ce64 = out.loss - 0.3 * out.aux_loss, (lambda o: o.loss - 0.3 * o.aux_loss)(
            twin(ids, labels=labels, attention_mask=mask))
        assert_close_to_reference(ours(ids, labels=labels, attention_mask=mask), ce.detach(), ce64, what="eval loss")


# ---------------------------------------------------------------------- generation
def _greedy_without_cache(ref, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """transformers' greedy continuation, each token from a full no-cache forward of everything so
    far. (transformers 5.25's own generate() disagrees with its full forward on some Qwen3.5
    checkpoints, so the reference for decoding is its forward, step by step.)"""
    with torch.no_grad():
        for _ in range(steps):
            nxt = ref(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return ids


def test_greedy_generation_across_a_chunk_boundary(pair):
    """Our cached decoding (conv + recurrent state on the linear layers, KV on the full one): a
    62-token prefill whose continuation crosses the delta rule's 64-token chunk boundary, and a
    70-token prefill that already spans two chunks."""
    from models.qwen import generate

    ref, _, ours = pair
    for length in (62, 70):
        ids = random_ids(1, length, seed=4)
        want = _greedy_without_cache(ref, ids, 10)
        assert torch.equal(generate(ours, ids, max_new_tokens=10, eos_ids=[]), want)


# ---------------------------------------------------------------------- checkpoints
def test_save_writes_what_transformers_loads(pair, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ref, _, ours = pair
    save(ours, tmp_path / "out")
    keys = set(load_file(str(tmp_path / "out" / "model.safetensors")))
    assert {"model.layers.3.mlp.experts.5.down_proj.weight", "model.layers.0.linear_attn.in_proj_qkvz.weight",
            "model.layers.0.linear_attn.in_proj_ba.weight", "model.layers.3.mlp.shared_expert_gate.weight",
            "model.layers.2.mlp.up_proj.weight"} <= keys
    assert not any("gate_up_proj" in k or "in_proj_qkv." in k for k in keys)  # per expert, as save_pretrained
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3NextForCausalLM"] and config["model_type"] == "qwen3_next"
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(back).__name__ == "Qwen3NextForCausalLM"
    want = ref.state_dict()
    assert back.state_dict().keys() == want.keys()
    assert all(torch.equal(v, want[k]) for k, v in back.state_dict().items())  # every tensor, to the bit


def test_fused_experts_and_mtp_head_load(tmp_path):
    """transformers' in-memory layout written as it is (experts fused: gate_up_proj [E, 2I, H],
    down_proj [E, H, I]) with an MTP head beside it, as the published checkpoints carry: the model
    loads (the MTP tensors left on disk, and written back by save: models/qwen/whole.py) with
    transformers' logits; a wrong fused shape is named."""
    from safetensors.torch import save_file

    ref = hf_qwen3_next(seed=5, tie_word_embeddings=True)
    state = {k: v.contiguous() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    state["mtp.fc.weight"] = torch.randn(64, 128)
    ref.config.save_pretrained(tmp_path)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    ours = load(tmp_path, dtype=torch.float32)
    assert ours.is_tied and list(ours.checkpoint_source.skipped) == ["mtp.fc.weight"]
    ids = random_ids(2, 75, seed=8)
    with torch.no_grad():
        assert_close_to_reference(ours(ids), ref(ids).logits, float64_twin(ref)(ids).logits, what="logits")
    state["model.layers.1.mlp.experts.down_proj"] = torch.zeros(5, 64, 64)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.experts.down_proj' has shape \(5, 64, 64\), "
                                         r"expected \(6, 64, 64\)"):
        load(tmp_path)


def test_nf4_load_quantises_every_projection_and_keeps_the_gates(tmp_path):
    """Streaming NF4 load: routed and shared experts, the dense MLP, attention and the fused
    linear-attention projections 4-bit; the router and shared_expert_gate stay 16-bit. Logits:
    transformers' model with each of those weights replaced by its bitsandbytes NF4 round trip
    (the rest of the computation unchanged: the same floor as the 16-bit comparison)."""
    pytest.importorskip("bitsandbytes.functional")
    from quant import NF4Linear

    ref = hf_qwen3_next(seed=3)
    ref.save_pretrained(tmp_path)
    q = load(tmp_path, dtype=torch.float32, quantize=NF4Quantizer())
    mlp, linear = q.model.layers[0].mlp, q.model.layers[0].linear_attn
    assert all(isinstance(getattr(e, p), NF4Linear) for e in [*mlp.experts, mlp.shared_expert, q.model.layers[2].mlp]
               for p in ("gate_proj", "up_proj", "down_proj"))
    assert all(isinstance(getattr(linear, p), NF4Linear) for p in ("in_proj_qkvz", "in_proj_ba", "out_proj"))
    assert isinstance(mlp.gate, TopKRouter) and type(mlp.shared_expert_gate) is SharedExpertGate
    assert mlp.shared_expert_gate.weight.dtype == torch.float32

    nf4_round_trip_decoder(ref, keep=("shared_expert_gate",))
    twin = float64_twin(ref)  # the same rounded weights in float64: the floor of the computation
    with torch.no_grad():
        ids = random_ids(2, 19)
        assert_close_to_reference(q(ids), ref(ids).logits, twin(ids).logits, what="nf4 logits")


def test_gguf_export_refuses_a_dense_qwen3_next_layer_in_one_line(tmp_path):
    """llama.cpp's qwen3next architecture has only expert FFNs (gguf's MODEL_TENSORS holds no
    ffn_gate/ffn_up/ffn_down for it): a Qwen3-Next folder with a dense layer (mlp_only_layers) is
    refused before any tensor is read. (The export itself: tests/models/test_gguf_hybrid.py.)"""
    gguf = pytest.importorskip("gguf")
    from models.qwen.export import ExportError, export_gguf

    assert gguf.MODEL_TENSOR.FFN_GATE not in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.QWEN3NEXT]
    hf_config(layer_types=["linear_attention"] * 3 + ["full_attention"]).save_pretrained(tmp_path)
    with pytest.raises(ExportError, match=r"config\.json: layer 2 is dense .* qwen3next") as info:
        export_gguf(tmp_path, tmp_path / "x.gguf")
    assert "\n" not in str(info.value)
