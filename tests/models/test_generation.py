"""KV-cache generation against transformers' generate (greedy) and sampling properties."""

import pytest
import torch

from models.qwen import generate, load, sample_next
from tests.helpers import hf_model, random_ids, save_hf_model


@pytest.fixture(params=["qwen2", "qwen3"])
def pair(request, tmp_path):
    ref = hf_model(request.param, tie_word_embeddings=request.param == "qwen2")
    return ref, load(save_hf_model(ref, tmp_path), dtype=torch.float32)


def test_greedy_matches_transformers_for_32_tokens(pair):
    ref, ours = pair
    ids = random_ids(1, 9, seed=11)
    got = generate(ours, ids, max_new_tokens=32, eos_ids=[])
    want = ref.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False, eos_token_id=None,
                        pad_token_id=0)
    assert got.shape == (1, 9 + 32)
    assert torch.equal(got, want)


def test_greedy_stops_at_eos(pair):
    _, ours = pair
    ids = random_ids(1, 5, seed=12)
    full = generate(ours, ids, max_new_tokens=12, eos_ids=[])
    eos = int(full[0, 5 + 3])  # make the 4th generated token the eos
    out = generate(ours, ids, max_new_tokens=12, eos_ids=[eos])
    assert out.shape[1] <= 5 + 4 and int(out[0, -1]) == eos


def test_left_padded_batch_equals_each_prompt_alone(pair):
    _, ours = pair
    a, b = random_ids(1, 8, seed=13), random_ids(1, 5, seed=14)
    pad = 0
    batch = torch.cat([a, torch.cat([torch.full((1, 3), pad), b], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    out = generate(ours, batch, max_new_tokens=10, eos_ids=[], attention_mask=mask)
    assert torch.equal(out[0, 8:], generate(ours, a, max_new_tokens=10, eos_ids=[])[0, 8:])
    assert torch.equal(out[1, 8:], generate(ours, b, max_new_tokens=10, eos_ids=[])[0, 5:])


def test_cache_logits_equal_full_forward(pair):
    _, ours = pair
    from models.qwen import KVCache

    ids = random_ids(2, 12, seed=15)
    with torch.no_grad():
        full = ours(ids)
        cache = KVCache(ours.config, 2, 12, device="cpu", dtype=torch.float32)
        first = ours(ids[:, :7], cache=cache)
        rest = ours(ids[:, 7:], cache=cache)  # a multi-token chunk appended to the cache
    torch.testing.assert_close(torch.cat([first, rest], 1), full, rtol=1e-5, atol=1e-5)


def test_sampling_respects_top_k_and_top_p():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(500, 1)
    g = torch.Generator().manual_seed(0)
    picks = sample_next(logits, temperature=1.0, top_k=2, generator=g)
    assert set(picks.tolist()) <= {0, 1} and len(set(picks.tolist())) == 2
    # top_p=0.5: softmax mass of token 0 is ~0.64 >= 0.5, so only token 0 survives
    picks = sample_next(logits, temperature=1.0, top_p=0.5, generator=g)
    assert set(picks.tolist()) == {0}
    assert torch.equal(sample_next(logits[:1], temperature=0.0), torch.tensor([0]))
