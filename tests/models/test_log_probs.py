"""Per-row log-probabilities through the chunked head (reduction="none", linear_log_probs) against
a plain log_softmax + gather: on transformers' own model (values and every gradient), and on
bare tensors (tiny chunks, both gradient paths, underflowing targets, rows with no label)."""

import pytest
import torch

from models.qwen import load
from models.qwen.loss import linear_log_probs
from tests.helpers import DEVICES, hf_model, max_rel_err, random_ids, save_hf_model


def gathered_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The reference: sum over t of log_softmax(logits[:, t])[labels[:, t + 1]] where labelled, [B]."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
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
    nll, n = ours(ids, labels=labels, reduction="none")
    expected = gathered_logps(ref(ids).logits, labels)
    assert n.tolist() == [12, 5, 16, 0]
    assert max_rel_err(-nll, expected) <= 1e-5
    assert nll[3].item() == 0.0
    # A different weight per row, as a preference loss gives each response.
    weights = torch.tensor([0.7, -1.3, 0.2, 5.0], device=device)
    (weights * nll).sum().backward()
    (-(weights * expected)).sum().backward()
    ref_params = dict(ref.named_parameters())
    checked = 0
    for name, p in ours.named_parameters():
        if p.requires_grad:
            assert max_rel_err(p.grad, ref_params[name].grad) <= 1e-4, name
            checked += 1
    assert checked >= 10


def test_none_reduction_sums_to_the_sum_reduction(pair):
    _, ours = pair
    ids = random_ids(4, 17, seed=4)
    labels = row_labels(ids)
    with torch.no_grad():
        nll, n = ours(ids, labels=labels, reduction="none")
        total, count = ours(ids, labels=labels, reduction="sum")
    assert int(n.sum()) == int(count)
    assert torch.allclose(nll.sum(), total, rtol=1e-6)


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
    h2 = hidden.detach().clone().requires_grad_()
    w2 = weight.detach().clone().requires_grad_(need_weight_grad)
    expected = gathered_logps(h2 @ w2.t(), labels)
    assert n.tolist() == [28, 39, 0]
    assert torch.allclose(logps, expected, rtol=1e-6) and logps[2].item() == 0.0
    row_weights = torch.tensor([2.0, -0.5, 3.0])
    (row_weights * logps).sum().backward()
    (row_weights * expected).sum().backward()
    assert max_rel_err(hidden.grad, h2.grad) <= 1e-5
    if need_weight_grad:
        assert max_rel_err(weight.grad, w2.grad) <= 1e-5


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
    h2 = hidden.detach().clone().requires_grad_()
    expected = gathered_logps(h2 @ weight.t(), labels)
    assert torch.isfinite(logps).all() and expected.min() < -1000
    assert torch.allclose(logps, expected, rtol=1e-6)
    logps.sum().backward()
    expected.sum().backward()
    assert max_rel_err(hidden.grad, h2.grad) <= 1e-5
