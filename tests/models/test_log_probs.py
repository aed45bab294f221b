"""Per-row log-probabilities through the chunked head (reduction="none", linear_log_probs) against
a plain log_softmax + gather: on transformers' own model (values and every gradient), and on
bare tensors (tiny chunks, both gradient paths, underflowing targets, rows with no label)."""

import pytest
import torch

from models.qwen import load
from models.qwen.loss import linear_log_probs
from tests.helpers import (DEVICES, assert_close_to_reference, assert_grads_close, float64_twin, hf_model, random_ids,
                           save_hf_model)


def gathered_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The reference: sum over t of log_softmax(logits[:, t])[labels[:, t + 1]] where labelled, [B]."""
    logp = torch.log_softmax(logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    targets = labels[:, 1:]
    keep = targets != -100
    picked = logp.gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1)
    return (picked * keep).sum(1)


def row_labels(ids: torch.Tensor) -> torch.Tensor:
    """Labels with a different scored span per row (as chosen/rejected responses), one row unscored."""
    labels = torch.full_like(ids, -100)
    labels[0, 5:] = ids[0, 5:]
    labels[1, 9:14] = ids[1, 9:14]
    labels[2, 1:] = ids[2, 1:]
    return labels  # row 3: nothing scored


@pytest.fixture(params=[("qwen2", True), ("qwen3", False)], ids=["qwen2-tied", "qwen3-untied"])
def pair(request, tmp_path):
    kind, tied = request.param
    ref = hf_model(kind, tie_word_embeddings=tied)
    save_hf_model(ref, tmp_path / "ckpt")
    return ref, load(tmp_path / "ckpt", dtype=torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head", ["trainable", "frozen"])
def test_per_row_logps_and_gradients_match_transformers(pair, device, head):
    ref, ours = (m.to(device) for m in pair)
    if head == "frozen":  # the LoRA case: the head gets no gradient (the other gradient path)
        for model in (ref, ours):
            model.lm_head.weight.requires_grad_(False)
            model.model.embed_tokens.weight.requires_grad_(False)
    ids = random_ids(4, 17, seed=3).to(device)
    labels = row_labels(ids)
    twin = float64_twin(ref)
    nll, n = ours(ids, labels=labels, reduction="none")
    expected, expected64 = (gathered_logps(m(ids).logits, labels) for m in (ref, twin))
    assert n.tolist() == [12, 5, 16, 0]
    assert_close_to_reference(-nll, expected, expected64)
    assert nll[3].item() == 0.0
    # A different weight per row, as a preference loss gives each response.
    weights = torch.tensor([0.7, -1.3, 0.2, 5.0], device=device)
    (weights * nll).sum().backward()
    (-(weights * expected)).sum().backward()
    (-(weights.double() * expected64)).sum().backward()
    assert sum(p.requires_grad for p in ours.parameters()) >= 10
    assert_grads_close(ours, ref, twin)


def test_none_reduction_sums_to_the_sum_reduction(pair):
    _, ours = pair
    ids = random_ids(4, 17, seed=4)
    labels = row_labels(ids)
    with torch.no_grad():
        nll, n = ours(ids, labels=labels, reduction="none")
        total, count = ours(ids, labels=labels, reduction="sum")
    assert int(n.sum()) == int(count)
    assert torch.allclose(nll.sum(), total, rtol=1e-6)  # the same terms summed in two orders: a few ulps


def _gathered_with_grads(hidden, weight, labels, row_weights, dtype):
    """gathered_logps of hidden @ weight.T in `dtype`, and the gradients of sum(row_weights x it)
    for hidden and weight: the reference (fp32) and its floor (float64)."""
    h = hidden.detach().to(dtype).requires_grad_()
    w = weight.detach().to(dtype).requires_grad_()
    logps = gathered_logps(h @ w.t(), labels)
    (row_weights.to(dtype) * logps).sum().backward()
    return logps.detach(), h.grad, w.grad


@pytest.mark.parametrize("need_weight_grad", [True, False])
def test_linear_log_probs_in_tiny_chunks(need_weight_grad):
    torch.manual_seed(0)
    hidden = torch.randn(3, 40, 16, requires_grad=True)
    weight = torch.randn(97, 16, requires_grad=need_weight_grad)
    labels = torch.randint(0, 97, (3, 40))
    labels[0, :12] = -100
    labels[2] = -100  # a row with nothing scored
    # 97 * 3 elements -> 3 positions per chunk: chunks straddle the rows.
    logps, n = linear_log_probs(hidden, weight, labels, chunk_elements=97 * 3)
    row_weights = torch.tensor([2.0, -0.5, 3.0])
    (row_weights * logps).sum().backward()
    (e32, h32, w32), (e64, h64, w64) = (_gathered_with_grads(hidden, weight, labels, row_weights, dtype)
                                        for dtype in (torch.float32, torch.float64))
    assert n.tolist() == [28, 39, 0]
    assert logps[2].item() == 0.0
    assert_close_to_reference(logps, e32, e64, what="log-probs")
    assert_close_to_reference(hidden.grad, h32, h64, what="hidden.grad")
    if need_weight_grad:
        assert_close_to_reference(weight.grad, w32, w64, what="weight.grad")


def test_linear_log_probs_when_the_target_probability_underflows():
    # Targets ~300 nats below the best logit: softmax underflows to 0 in fp32; the log-prob must
    # still be the exact logit - logsumexp, and the gradient finite.
    torch.manual_seed(1)
    hidden = torch.randn(2, 9, 8)
    weight = torch.randn(31, 8)
    labels = torch.randint(1, 31, (2, 9))
    weight[0] = 0.0
    weight[0, 0] = 1.0
    hidden[:, :, 0] = 300.0
    labels[0, 1:5] = 0
    hidden.requires_grad_()
    logps, _ = linear_log_probs(hidden, weight, labels, chunk_elements=31 * 4)
    logps.sum().backward()
    (e32, h32, _), (e64, h64, _) = (_gathered_with_grads(hidden, weight, labels, torch.ones(2), dtype)
                                    for dtype in (torch.float32, torch.float64))
    assert torch.isfinite(logps).all() and e32.min() < -1000
    assert_close_to_reference(logps, e32, e64, what="log-probs")
    assert_close_to_reference(hidden.grad, h32, h64, what="hidden.grad")
