"""Qwen3.5 text models (hybrid Gated DeltaNet + gated full attention) against transformers'
Qwen3_5ForCausalLM / Qwen3_5ForConditionalGeneration on tiny random models (fp32, CPU).

The chunked delta rule runs in 64-token chunks, so the lengths below sit inside one chunk, on a
chunk boundary and across several (not a multiple of 64). Both sides evaluate the same
arithmetic in the same order (our chunked rule follows transformers' torch fallback step by
step), which is why logits agree to 1e-5 even across chunks; the ~1e-7 that remains comes from
the softmax-attention layers (SDPA on our side, transformers' sdpa/eager on theirs).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from models.qwen import KVCache, QwenConfig, generate, load, save
from models.qwen.linear_attention import _UnitLowerInverse, chunk_gated_delta_rule, recurrent_gated_delta_rule
from tests.helpers import (assert_close_to_reference, assert_grads_match, assert_logits_match, float64_twin,
                           max_rel_err, random_ids)

pytestmark = pytest.mark.filterwarnings("ignore:.*falling back to its reference PyTorch implementation")

# Every linear's input width is a multiple of 64 (bitsandbytes' NF4 block; its CPU kernel is
# only right for whole-block rows, see tests/quant/conftest.py), the value heads are twice the
# q/k heads (grouped) and wider, head_dim 16 with partial_rotary_factor 0.25 rotates 4 dims,
# and both token mixers appear, full attention between two linear layers.
TINY_QWEN35 = dict(
    vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    layer_types=["linear_attention", "full_attention", "linear_attention"],
    linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=16,
    linear_num_key_heads=2, linear_num_value_heads=4, max_position_embeddings=512,
)


def qwen35_text_config(**overrides):
    from transformers import Qwen3_5TextConfig

    return Qwen3_5TextConfig(**{**TINY_QWEN35, **overrides})


@torch.no_grad()
def _randomise_small_parameters(model, scale: float = 0.1) -> None:
    """transformers initialises norms to 0/1, dt_bias to 1 and biases to 0: randomise them, so a
    loader or a formula that ignores one of them shows. A = exp(A_log) is drawn from U(0.01, 0.3)
    instead of HF's U(0.01, 16): per-token decays of 0.6-0.99 rather than down to e^-20, so the
    state really carries across tokens and chunks (and its gradients are not all ~1e-9)."""
    for name, p in model.named_parameters():
        if name.endswith("A_log"):
            p.copy_(torch.empty_like(p).uniform_(0.01, 0.3).log())
        elif "norm" in name or name.endswith(("dt_bias", ".bias")):
            p.add_(torch.randn_like(p) * scale)


def hf_qwen35(seed: int = 0, **overrides):
    """A tiny random transformers Qwen3_5ForCausalLM (fp32, eval)."""
    from transformers import Qwen3_5ForCausalLM

    torch.manual_seed(seed)
    model = Qwen3_5ForCausalLM(qwen35_text_config(**overrides)).float().eval()
    _randomise_small_parameters(model)
    return model


def hf_qwen35_multimodal(seed: int = 0, **overrides):
    """A tiny random Qwen3_5ForConditionalGeneration: the text model nested under
    model.language_model, beside a one-block vision tower (model.visual)."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    torch.manual_seed(seed)
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=64,
                  patch_size=4, temporal_patch_size=1, num_position_embeddings=16)
    text = qwen35_text_config(**overrides).to_dict()
    config = Qwen3_5Config(text_config=text, vision_config=vision,
                           tie_word_embeddings=overrides.get("tie_word_embeddings", False))
    model = Qwen3_5ForConditionalGeneration(config).float().eval()
    _randomise_small_parameters(model)
    return model


VARIANTS = {
    "untied": dict(tie_word_embeddings=False),
    "tied-bias": dict(tie_word_embeddings=True, attention_bias=True),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    ref = hf_qwen35(**VARIANTS[request.param])
    path = tmp_path_factory.mktemp("qwen35") / "ckpt"
    ref.save_pretrained(path)
    return ref, load(path, dtype=torch.float32)


# ---------------------------------------------------------------------- config
def test_config_reads_what_transformers_wrote(tmp_path):
    from transformers import AutoConfig

    qwen35_text_config(tie_word_embeddings=True).save_pretrained(tmp_path)
    cfg = QwenConfig.from_hf(tmp_path)
    assert cfg.is_qwen35 and cfg.model_type == "qwen3_5_text"
    assert cfg.layer_types == TINY_QWEN35["layer_types"]
    assert (cfg.head_dim, cfg.rotary_dim, cfg.qk_norm, cfg.attention_bias) == (16, 4, True, False)
    assert (cfg.linear_key_dim, cfg.linear_value_dim, cfg.linear_conv_dim) == (16, 64, 96)
    assert cfg.tie_word_embeddings is True
    # and what we write back is what transformers reads
    out = tmp_path / "ours"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(cfg.to_hf()))
    hf = AutoConfig.from_pretrained(out)
    assert hf.model_type == "qwen3_5_text" and hf.layer_types == cfg.layer_types
    assert hf.rope_parameters["partial_rotary_factor"] == 0.25 and hf.linear_num_value_heads == 4
    assert QwenConfig.from_hf(out).to_hf() == cfg.to_hf()


def test_config_defaults_and_errors(tmp_path):
    from models.qwen import ConfigError

    cfg = QwenConfig(model_type="qwen3_5_text", num_hidden_layers=8, head_dim=16, partial_rotary_factor=0.25)
    assert cfg.layer_types == ["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + ["full_attention"]
    with pytest.raises(ConfigError, match="layer_types has 2 entries"):
        QwenConfig(model_type="qwen3_5_text", num_hidden_layers=3, layer_types=["full_attention"] * 2)
    with pytest.raises(ConfigError, match="'sliding'"):
        QwenConfig(model_type="qwen3_5_text", num_hidden_layers=1, layer_types=["sliding"])
    with pytest.raises(ConfigError, match="linear attention needs model_type"):
        QwenConfig(num_hidden_layers=1, layer_types=["linear_attention"])
    # (Qwen3.5-MoE is read by the same code: tests/models/test_qwen35_moe.py)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_5_moe", "text_config": {}}))
    with pytest.raises(ConfigError, match=r"\(text_config\): missing required key 'num_hidden_layers'"):
        QwenConfig.from_hf(tmp_path)


def test_parameter_count_matches_transformers():
    from transformers import Qwen3_5ForCausalLM

    for kw in VARIANTS.values():
        ref = Qwen3_5ForCausalLM(qwen35_text_config(**kw))
        cfg = QwenConfig(model_type="qwen3_5_text", **{**TINY_QWEN35, **kw})
        assert cfg.num_parameters() == sum(p.numel() for p in ref.parameters())


# ---------------------------------------------------------------------- forward
@pytest.mark.parametrize("length", [37, 64, 150])
def test_logits_match_transformers(pair, length):
    ref, ours = pair
    ids = random_ids(2, length, seed=length)
    with torch.no_grad():
        assert_logits_match(ours(ids), ref, ids)


def test_loss_and_gradients_match_transformers(pair):
    ref, ours = pair
    ref.train(), ours.train()
    ids = random_ids(2, 100, seed=1)  # two chunks, the second one partial
    labels = ids.clone()
    labels[0, :30] = -100
    ref.zero_grad(), ours.zero_grad()
    names = [n for n, _ in ours.named_parameters()]
    assert any(".linear_attn.A_log" in n for n in names) and any(".self_attn.q_norm" in n for n in names)
    assert_grads_match(ours, ref, ids, labels=labels)
    ref.zero_grad(), ours.zero_grad()
    ref.eval(), ours.eval()


def test_sum_reduction_and_gradient_checkpointing(pair):
    _, ours = pair
    ours.train()
    ours.zero_grad()
    ids = random_ids(2, 80, seed=2)
    labels = ids.clone()
    labels[:, :10] = -100
    loss_sum, n = ours(ids, labels=labels, reduction="sum")
    assert n.item() == 2 * 70
    loss_sum.backward()
    plain = {k: p.grad.clone() for k, p in ours.named_parameters()}
    ours.zero_grad()
    ours.enable_gradient_checkpointing()
    loss_ckpt, _ = ours(ids, labels=labels, reduction="sum")
    loss_ckpt.backward()
    ours.enable_gradient_checkpointing(False)
    assert torch.equal(loss_ckpt, loss_sum)
    for k, p in ours.named_parameters():
        # the same ops recomputed: only the order gradient contributions add up may differ, a
        # few fp32 ulps (2**-23 = 1.2e-7); 1e-6 is 8 of them
        assert max_rel_err(p.grad, plain[k]) <= 1e-6, k
    ours.zero_grad()
    ours.eval()


def test_packed_documents_equal_each_document_alone(pair):
    """With document_ids, the linear layers restart their state (and conv window) at every
    document start and full attention is block-causal: each document of a packed row gets the
    logits transformers gives it alone. Documents cross the 64-token chunk boundary."""
    ref, ours = pair
    lengths = [50, 41, 3, 36]  # 130 tokens: the second document spans chunks 0-1
    docs = [random_ids(1, n, seed=10 + i) for i, n in enumerate(lengths)]
    packed = torch.cat(docs, dim=1)
    document_ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    with torch.no_grad():
        got = ours(packed, document_ids=document_ids)
        alone = torch.cat([ref(d).logits for d in docs], dim=1)
        twin = float64_twin(ref)
        assert_close_to_reference(got, alone, torch.cat([twin(d).logits for d in docs], dim=1))
        assert max_rel_err(ours(packed), alone) > 1e-2  # without document_ids they do mix


def test_left_padding_with_attention_mask(pair):
    """Padding tokens are zeroed before the linear layers (as transformers does), so a
    left-padded row gives the logits of its tokens alone."""
    _, ours = pair
    ids = random_ids(2, 70, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    with torch.no_grad():
        got = ours(ids, attention_mask=mask)
        # ours against ours (our linear attention runs in fp32 only, so it has no float64 twin):
        # the floor measured against transformers' float64 twin on these logits is ~3e-7
        # (test_logits_match_transformers), so 1e-5 is ~30 floors
        assert max_rel_err(got[1, 9:], ours(ids[1:, 9:])[0]) <= 1e-5
        assert max_rel_err(got[0], ours(ids[:1])[0]) <= 1e-5


def test_bf16_weights_and_autocast_track_transformers(tmp_path):
    """16-bit paths (the conv in bf16, the recurrence kept in fp32, fp32 decay from a bf16 A_log):
    bf16 weights agree with transformers' bf16 model to a couple of bf16 roundings (measured
    5e-3 of the largest logit, as far from fp32 as transformers is), autocast likewise."""
    from transformers import AutoModelForCausalLM

    ref = hf_qwen35(seed=1)
    ref.save_pretrained(tmp_path)
    ids = random_ids(2, 100, seed=3)
    with torch.no_grad():
        full = ref(ids).logits
        hf16 = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
        ours16 = load(tmp_path, dtype=torch.bfloat16)
        assert max_rel_err(ours16(ids).float(), hf16(ids).logits.float()) <= 2e-2
        loss16, loss_hf16 = ours16(ids, labels=ids), hf16(ids, labels=ids).loss
        assert abs(loss16.item() - loss_hf16.item()) <= 1e-3 * loss_hf16.item()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = load(tmp_path, dtype=torch.float32)(ids)
        assert max_rel_err(mixed.float(), full) <= 2e-2


# ---------------------------------------------------------------------- the delta rule
def test_chunked_rule_equals_recurrence_with_state_and_document_resets():
    """Both evaluations of the gated delta rule (ours), on random inputs with strong decay,
    an initial state and resets: the chunked one with document_ids equals the token-by-token
    recurrence run on each document separately."""
    torch.manual_seed(0)
    B, H, T, Dk, Dv = 2, 3, 150, 8, 5
    q = torch.nn.functional.normalize(torch.randn(B, H, T, Dk), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, H, T, Dk), dim=-1)
    v, beta = torch.randn(B, H, T, Dv), torch.rand(B, H, T)
    g = -torch.rand(B, H, T) * 0.5
    state0 = torch.randn(B, H, Dk, Dv)
    out_c, state_c = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=state0)
    out_r, state_r = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=state0)
    out64, state64 = recurrent_gated_delta_rule(*(t.double() for t in (q, k, v, g, beta)),
                                                initial_state=state0.double())
    assert_close_to_reference(out_c, out_r, out64, what="output")
    assert_close_to_reference(state_c, state_r, state64, what="state")

    starts = [0, 40, 64, 65, 130]  # a reset on a chunk start, one just after, one mid-chunk
    ids = torch.zeros(B, T, dtype=torch.long)
    for i, s in enumerate(starts):
        ids[:, s:] = i
    out_docs, _ = chunk_gated_delta_rule(q, k, v, g, beta, document_ids=ids)
    ends = starts[1:] + [T]
    alone, alone64 = (torch.cat([recurrent_gated_delta_rule(*(t[:, :, s:e].to(dtype) for t in (q, k, v, g, beta)))[0]
                                 for s, e in zip(starts, ends)], dim=2) for dtype in (torch.float32, torch.float64))
    assert_close_to_reference(out_docs, alone, alone64)


def test_unit_lower_inverse_and_its_hand_written_backward():
    """The chunked rule's (I + strict_lower(A))^-1 against torch.linalg.inv, and its backward
    against finite differences (float64)."""
    torch.manual_seed(0)
    a = (torch.randn(2, 7, 7, dtype=torch.float64) * 0.3).requires_grad_()
    inverse = _UnitLowerInverse.apply(a)
    eye = torch.eye(7, dtype=torch.float64)
    assert torch.allclose(inverse, torch.linalg.inv(eye + a.detach().tril(-1)), atol=1e-12)
    assert torch.autograd.gradcheck(_UnitLowerInverse.apply, (a,))


# ---------------------------------------------------------------------- generation and cache
def test_greedy_generation_equals_transformers_batch_1(pair):
    ref, ours = pair
    ids = random_ids(1, 70, seed=4)  # the prefill crosses a chunk boundary
    got = generate(ours, ids, max_new_tokens=20, eos_ids=[])
    want = ref.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False, eos_token_id=None,
                        pad_token_id=0)
    assert torch.equal(got, want)


def test_greedy_generation_equals_transformers_batch_2_left_padded(pair):
    ref, ours = pair
    a, b = random_ids(1, 21, seed=5), random_ids(1, 13, seed=6)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 8, dtype=torch.long), b], dim=1)])
    mask = torch.ones_like(ids)
    mask[1, :8] = 0
    got = generate(ours, ids, max_new_tokens=16, eos_ids=[], attention_mask=mask, pad_id=0)
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                        eos_token_id=None, pad_token_id=0)
    assert torch.equal(got, want)
    # and each row is what its prompt gives alone (the padding leaves no trace in the state)
    assert torch.equal(got[1, 21:], generate(ours, b, max_new_tokens=16, eos_ids=[])[0, 13:])


def test_cache_chunks_and_single_steps_equal_full_forward(pair):
    """Prefill, a multi-token chunk appended to the cache (chunked rule from a carried state)
    and single decoding steps (the recurrence) give the logits of one full forward."""
    _, ours = pair
    ids = random_ids(2, 90, seed=7)
    with torch.no_grad():
        full = ours(ids)
        cache = KVCache(ours.config, 2, 90, device="cpu", dtype=torch.float32)
        parts = [ours(ids[:, :50], cache=cache), ours(ids[:, 50:87], cache=cache)]
        parts += [ours(ids[:, t : t + 1], cache=cache) for t in range(87, 90)]
    assert cache.k[0] is None and cache.conv[1] is None  # layer 0 linear, layer 1 full attention
    # the same function evaluated chunked / token by token, all ours in fp32 (see the left-padding
    # test for why 1e-5 is ~30 floors)
    assert max_rel_err(torch.cat(parts, dim=1), full) <= 1e-5


# ---------------------------------------------------------------------- checkpoints
def test_multimodal_checkpoint_loads_its_text_model(tmp_path):
    """A qwen3_5 (Qwen3_5ForConditionalGeneration) checkpoint: the text model is read from
    model.language_model.*, the vision tower and any MTP tensors are left on disk, and save()
    writes the whole checkpoint back, which transformers loads with the same logits
    (tests/models/test_whole.py checks the rest of what it writes)."""
    from safetensors.torch import load_file, save_file
    from transformers import Qwen3_5ForConditionalGeneration

    ref = hf_qwen35_multimodal(tie_word_embeddings=True)
    ref.save_pretrained(tmp_path / "vl")
    # Real Qwen3.5 checkpoints also carry the multi-token-prediction head: add one tensor of it.
    weights = load_file(tmp_path / "vl" / "model.safetensors")
    weights["mtp.fc.weight"] = torch.randn(64, 128)
    save_file(weights, tmp_path / "vl" / "model.safetensors", metadata={"format": "pt"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is lost, so nothing to warn about
        ours = load(tmp_path / "vl", dtype=torch.float32)
    assert ours.config.source_format == "qwen3_5" and ours.is_tied
    assert sorted(ours.checkpoint_source.skipped) == sorted(k for k in weights if not k.startswith("model.language"))
    ids = random_ids(2, 75, seed=8)
    with torch.no_grad():
        assert_logits_match(ours(ids), ref, input_ids=ids)
    save(ours, tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert saved["model_type"] == "qwen3_5" and saved["architectures"] == ["Qwen3_5ForConditionalGeneration"]
    back = Qwen3_5ForConditionalGeneration.from_pretrained(tmp_path / "again", dtype=torch.float32).eval()
    with torch.no_grad():
        assert_logits_match(back(input_ids=ids).logits, ref, input_ids=ids)


def test_missing_linear_attention_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    from models.qwen import CheckpointError

    hf_qwen35().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.2.linear_attn.A_log"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.2.linear_attn.A_log'"):
        load(tmp_path, dtype=torch.float32)
