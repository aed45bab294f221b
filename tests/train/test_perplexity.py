"""Sliding-window perplexity against transformers on the same tiny checkpoint."""

import math

import pytest
import torch

from models.qwen import load
from tests.helpers import hf_model, save_hf_model
from train.perplexity import document_windows, encode_documents, perplexity, window_batch

LENGTHS = [1, 2, 7, 32, 33, 61, 130]  # shorter than, equal to and much longer than the window


def _documents(seed=0, vocab=320):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in LENGTHS]


def _hf_reference(ref, documents, max_length, stride):
    """Hugging Face's "perplexity of fixed-length models" loop, one document at a time,
    through the transformers model's own loss (mean over the valid shifted labels)."""
    nll, count = 0.0, 0
    for doc in documents:
        ids = torch.tensor(doc)[None]
        n = ids.shape[1]
        prev_end = 0
        for begin in range(0, n, stride):
            end = min(begin + max_length, n)
            trg_len = end - prev_end  # may be different from stride on the last loop
            input_ids = ids[:, begin:end]
            target = input_ids.clone()
            target[:, :-trg_len] = -100
            valid = int((target[:, 1:] != -100).sum())
            if valid:
                with torch.no_grad():
                    loss = ref(input_ids, labels=target).loss
                nll += float(loss) * valid
                count += valid
            prev_end = end
            if end == n:
                break
    return math.exp(nll / count), count


@pytest.fixture(scope="module", params=["qwen2", "qwen3"])
def pair(request, tmp_path_factory):
    ref = hf_model(request.param, tie_word_embeddings=request.param == "qwen2")
    path = save_hf_model(ref, tmp_path_factory.mktemp(request.param))
    return ref, load(path, dtype=torch.float32)


@pytest.mark.parametrize("max_length, stride", [(32, 12), (16, 15), (24, 5)])
def test_equals_transformers_sliding_window(pair, max_length, stride):
    ref, ours = pair
    docs = _documents()
    want, count = _hf_reference(ref, docs, max_length, stride)
    got = perplexity(ours, docs, max_length=max_length, stride=stride, batch_size=4)
    assert got.n_tokens == count == sum(n - 1 for n in LENGTHS)  # every token but the first, once
    # observed 1.1e-8 to 2.3e-7 (430x margin): exp of a float64 sum of fp32 NLLs
    assert abs(got.ppl - want) / want < 1e-4
    assert got.ppl == pytest.approx(math.exp(got.nll_sum / got.n_tokens))
    assert got.tokens_per_s > 0 and got.seconds > 0 and got.n_documents == len(docs)


def test_short_documents_equal_exp_of_mean_transformers_loss(pair):
    # Documents inside one window: ppl = exp(token-weighted mean of the full-sequence losses).
    ref, ours = pair
    docs = _documents(seed=3)[:5]  # lengths up to 33
    nll = count = 0
    for doc in docs:
        if len(doc) < 2:
            continue
        ids = torch.tensor(doc)[None]
        with torch.no_grad():
            logits = ref(ids).logits[0, :-1].double()
        nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += len(doc) - 1
    got = perplexity(ours, docs, max_length=64, stride=32)
    assert got.n_windows == 4 and got.n_tokens == count
    # observed at most 2.3e-7 (430x margin)
    assert abs(got.ppl - math.exp(nll / count)) / math.exp(nll / count) < 1e-4


def test_batch_size_does_not_change_the_result(pair):
    _, ours = pair
    docs = _documents(seed=1)
    results = [perplexity(ours, docs, max_length=20, stride=8, batch_size=b) for b in (1, 2, 5, 64)]
    for r in results[1:]:
        assert r.n_tokens == results[0].n_tokens and r.n_windows == results[0].n_windows
        assert r.ppl == pytest.approx(results[0].ppl, rel=1e-6)


def test_windows_score_every_token_once_with_context():
    for n in (2, 5, 16, 17, 100, 101):
        for max_length, stride in ((16, 4), (16, 15), (8, 1)):
            windows = document_windows(n, max_length, stride)
            scored = [t for w in windows for t in range(w.score_from, w.end)]
            assert scored == list(range(1, n))  # each token after the first, once, in order
            assert all(w.length <= max_length for w in windows)
            assert windows[-1].end == n
            # After the first window, every scored token sees >= max_length - stride tokens.
            for w in windows[1:]:
                assert w.score_from - w.begin >= max_length - stride
    assert document_windows(1, 16, 8) == [] and document_windows(0, 16, 8) == []


def test_window_batch_labels():
    docs = [[5, 6, 7, 8, 9], [1, 2, 3]]
    windows = document_windows(5, 4, 2, doc=0) + document_windows(3, 4, 2, doc=1)
    ids, labels = window_batch(docs, windows, pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 8], [7, 8, 9, 0], [1, 2, 3, 0]]
    assert labels.tolist() == [[-100, 6, 7, 8], [-100, -100, 9, -100], [-100, 2, 3, -100]]


def test_bad_arguments(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="stride"):
        perplexity(ours, [[1, 2, 3]], max_length=8, stride=8)
    with pytest.raises(ValueError, match="max_length"):
        perplexity(ours, [[1, 2, 3]], max_length=1, stride=1)
    with pytest.raises(ValueError, match="no documents"):
        perplexity(ours, [], max_length=8)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(ours, [[1], []], max_length=8)
    with pytest.raises(ValueError, match="batch_size"):
        perplexity(ours, [[1, 2]], max_length=8, batch_size=0)


def test_encode_documents_appends_endoftext():
    class Tok:
        def encode(self, text):
            return [ord(c) for c in text]

    assert encode_documents(Tok(), ["ab", "c"]) == [[97, 98, 151643], [99, 151643]]
    assert encode_documents(Tok(), ["ab"], append_eos=False) == [[97, 98]]
