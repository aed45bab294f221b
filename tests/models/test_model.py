"""Our decoder against transformers' Qwen2/Qwen3 on tiny random models (fp32), on the CPU and,
where there is one, on a CUDA device (both sides on the same device: SDPA takes CUDA's kernels)."""

import pytest
import torch
import torch.nn.functional as F

from models.qwen import load
from models.qwen.loss import linear_cross_entropy
from tests.helpers import (DEVICES, assert_close_to_reference, assert_grads_match, assert_logits_match, float64_twin,
                           hf_model, max_rel_err, random_ids, save_hf_model)

VARIANTS = [
    ("qwen2", dict(tie_word_embeddings=True)),
    ("qwen2", dict(tie_word_embeddings=False)),
    ("qwen3", dict(tie_word_embeddings=False)),
    ("qwen3", dict(tie_word_embeddings=True, attention_bias=True)),
]


@pytest.fixture(params=VARIANTS, ids=lambda v: f"{v[0]}-{'tied' if v[1].get('tie_word_embeddings') else 'untied'}")
def pair(request, tmp_path):
    kind, kw = request.param
    ref = hf_model(kind, **kw)
    save_hf_model(ref, tmp_path / "ckpt")
    ours = load(tmp_path / "ckpt", dtype=torch.float32)
    return ref, ours


def on(pair, device):
    """The (reference, ours) pair moved to `device`."""
    ref, ours = pair
    return ref.to(device), ours.to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_logits_match_transformers(pair, device):
    ref, ours = on(pair, device)
    ids = random_ids(3, 29).to(device)
    with torch.no_grad():
        assert_logits_match(ours(ids), ref, ids)


@pytest.mark.parametrize("device", DEVICES)
def test_loss_and_gradients_match_transformers(pair, device):
    ref, ours = on(pair, device)
    ref.train(), ours.train()
    ids = random_ids(2, 21, seed=1).to(device)
    labels = ids.clone()
    labels[0, :7] = -100
    assert_grads_match(ours, ref, ids, labels=labels)


def test_sum_reduction_counts_supervised_tokens(pair):
    _, ours = pair
    ids = random_ids(2, 12, seed=2)
    labels = ids.clone()
    labels[:, :4] = -100
    loss_sum, n = ours(ids, labels=labels, reduction="sum")
    # labels are shifted inside: position 0 is never a target, so 2 * (12 - 4) targets remain
    assert n.item() == 2 * 8
    # one division apart from the mean: a few fp32 ulps (2**-23), 1e-6 is 8 of them
    assert torch.allclose(loss_sum / n, ours(ids, labels=labels), rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_document_mask_equals_separate_documents(pair, device):
    """A packed row with document ids gives each document exactly its own logits."""
    _, ours = on(pair, device)
    a, b = random_ids(1, 9, seed=3).to(device), random_ids(1, 6, seed=4).to(device)
    packed = torch.cat([a, b], dim=1)
    docs = torch.tensor([[0] * 9 + [1] * 6], device=device)
    with torch.no_grad():
        got = ours(packed, document_ids=docs)
        sep = torch.cat([ours(a), ours(b)], dim=1)
        twin = float64_twin(ours)   # the floor: the same separate runs in float64
        assert_close_to_reference(got, sep, torch.cat([twin(a), twin(b)], dim=1))


@pytest.mark.parametrize("device", DEVICES)
def test_left_padding_with_attention_mask(pair, device):
    _, ours = on(pair, device)
    ids = random_ids(2, 10, seed=5).to(device)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        got = ours(ids, attention_mask=mask)
        twin = float64_twin(ours)
        assert_close_to_reference(got[1, 3:], ours(ids[1:, 3:])[0], twin(ids[1:, 3:])[0])
        assert_close_to_reference(got[0], ours(ids[:1])[0], twin(ids[:1])[0])


def _full_softmax_ce(hidden, weight, labels, dtype):
    """torch's F.cross_entropy over the full logits in `dtype`: (sum loss, d(2 loss)/d hidden,
    d(2 loss)/d weight), the reference (fp32) and its floor (float64)."""
    h = hidden.detach().to(dtype).requires_grad_()
    w = weight.detach().to(dtype).requires_grad_()
    logits = h[:, :-1] @ w.t()
    loss = F.cross_entropy(logits.reshape(-1, w.shape[0]), labels[:, 1:].reshape(-1), reduction="sum",
                           ignore_index=-100)
    (2.0 * loss).backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("device", DEVICES)
def test_chunked_cross_entropy_matches_full_softmax(device):
    torch.manual_seed(0)
    hidden = torch.randn(2, 50, 16).to(device).requires_grad_()
    weight = torch.randn(97, 16).to(device).requires_grad_()
    labels = torch.randint(0, 97, (2, 50)).to(device)
    labels[0, 10:20] = -100
    # Tiny chunks: 97 * 3 elements -> 3 tokens per chunk, many chunks.
    loss_sum, n = linear_cross_entropy(hidden, weight, labels, chunk_elements=97 * 3)
    assert n.item() == int((labels[:, 1:] != -100).sum())
    (2.0 * loss_sum).backward()
    ref32, ref64 = (_full_softmax_ce(hidden, weight, labels, dtype) for dtype in (torch.float32, torch.float64))
    for ours, want32, want64, what in zip((loss_sum.detach(), hidden.grad, weight.grad), ref32, ref64,
                                          ("loss", "hidden.grad", "weight.grad")):
        assert_close_to_reference(ours, want32, want64, what=what)


def test_chunked_cross_entropy_when_the_target_probability_underflows():
    # Targets 200 nats below the best logit: softmax gives p = 0 in fp32, so -log p would be
    # inf; the loss must still be the exact lse - logit and the gradient stay finite.
    torch.manual_seed(1)
    hidden = torch.randn(1, 9, 8)
    weight = torch.randn(31, 8)
    labels = torch.randint(1, 31, (1, 9))
    weight[0] = 0.0
    weight[0, 0] = 1.0
    hidden[0, :, 0] = 300.0  # token 0 scores ~300 everywhere, the rest ~0
    labels[0, 1:5] = 0  # half the targets are the dominant token, half are ~300 nats below
    hidden.requires_grad_()
    loss_sum, _ = linear_cross_entropy(hidden, weight, labels, chunk_elements=31 * 4)
    assert torch.isfinite(loss_sum)
    (2.0 * loss_sum).backward()
    ref32, ref64 = (_full_softmax_ce(hidden, weight, labels, dtype) for dtype in (torch.float32, torch.float64))
    assert ref32[0] > 1000
    assert_close_to_reference(loss_sum.detach(), ref32[0], ref64[0], what="loss")
    assert_close_to_reference(hidden.grad, ref32[1], ref64[1], what="hidden.grad")


def test_label_outside_vocabulary_is_an_error(pair):
    _, ours = pair
    ids = random_ids(1, 5)
    labels = ids.clone()
    labels[0, 3] = 10_000
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ours(ids, labels=labels)


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_checkpointing_changes_no_gradient(pair, device):
    _, ours = on(pair, device)
    ours.train()
    ids = random_ids(2, 16, seed=6).to(device)
    ours(ids, labels=ids).backward()
    plain = {n: p.grad.clone() for n, p in ours.named_parameters()}
    ours.zero_grad()
    ours.enable_gradient_checkpointing(True)
    ours(ids, labels=ids).backward()
    for n, p in ours.named_parameters():
        # the same ops recomputed; only the order gradient contributions add up may differ: a
        # few fp32 ulps (2**-23 = 1.2e-7), and 1e-6 is 8 of them
        assert max_rel_err(p.grad, plain[n]) <= 1e-6, n


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_close_to_fp32(pair, device):
    _, ours = on(pair, device)
    ids = random_ids(1, 16, seed=7).to(device)
    with torch.no_grad():
        full = ours(ids, labels=ids)
        with torch.autocast(device, dtype=torch.bfloat16):
            half = ours(ids, labels=ids)
    # bf16 keeps 8 mantissa bits (relative step 2**-8 = 3.9e-3 per rounding); over two layers the
    # loss moves by ~1e-2 of itself: 5% is a sanity bound on the autocast path, not a parity test
    assert abs(half.item() - full.item()) < 0.05 * full.item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gqa_attention_never_falls_back_to_the_math_kernel(device, dtype):
    # GQA (4 query heads over 2 KV heads) with every mask the pipeline passes: none (causal),
    # document ids (CPT packing), padding (SFT batches). SDPA's unfused math backend is
    # forbidden here, so a call it would fall back to raises instead of running slowly with
    # [B, H, T, T] scores (on CUDA: enable_gqa with a mask or fp32, see sdpa_broadcasts_kv_heads).
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from models.qwen import Qwen, QwenConfig

    torch.manual_seed(0)
    # head_dim 64: a size every fused kernel takes (the tiny test shapes' 12 and 20 are not).
    model = Qwen(QwenConfig.preset("tiny", vocab_size=64, hidden_size=256)).to(device=device, dtype=dtype)
    model.train()
    ids = random_ids(2, 24, vocab=64, seed=8).to(device)
    docs = torch.tensor([[0] * 10 + [1] * 14, [0] * 24], device=device)
    pad = torch.ones_like(ids)
    pad[1, :5] = 0
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    results = {}
    for name, kwargs in {"causal": {}, "documents": {"document_ids": docs}, "padding": {"attention_mask": pad}}.items():
        with sdpa_kernel(fused):
            loss = model(ids, labels=ids, **kwargs)
            loss.backward()
        results[name] = loss.detach()
        with torch.no_grad():  # and the same function as the math kernel (SDPA's own reference)
            with sdpa_kernel([SDPBackend.MATH]):
                reference = model(ids, labels=ids, **kwargs)
        # one scalar loss, the fused kernels against SDPA's math kernel on the same model: fp32
        # measured ~1e-7 relative (1e-5 is ~80 ulps); bf16 (8 mantissa bits, 3.9e-3 a step) 2e-2
        bound = 1e-5 if dtype == torch.float32 else 2e-2
        assert abs(results[name].float() - reference.float()) <= bound * reference.abs().float(), name
    assert not torch.equal(results["causal"], results["documents"])  # the mask did something


def test_expanded_kv_heads_are_the_same_attention(pair, monkeypatch):
    # The CUDA path for masked or fp32 GQA expands the KV heads before SDPA; forced here on the
    # CPU, it must give transformers' logits and those of SDPA's own broadcast (enable_gqa).
    import models.qwen.attention as attention

    ref, ours = pair
    ids = random_ids(2, 19, seed=9)
    docs = torch.tensor([[0] * 7 + [1] * 12, [0] * 19])
    with torch.no_grad():
        broadcast_causal, broadcast_docs = ours(ids), ours(ids, document_ids=docs)
        monkeypatch.setattr(attention, "sdpa_broadcasts_kv_heads", lambda q, mask: False)
        expanded_causal, expanded_docs = ours(ids), ours(ids, document_ids=docs)
        assert_logits_match(expanded_causal, ref, ids)
    # the same SDPA on the same values, the KV heads repeated in memory or broadcast: measured
    # bit-equal here; 1e-6 (8 fp32 ulps) leaves room for a kernel that blocks them differently
    assert max_rel_err(expanded_causal, broadcast_causal) <= 1e-6
    assert max_rel_err(expanded_docs, broadcast_docs) <= 1e-6
