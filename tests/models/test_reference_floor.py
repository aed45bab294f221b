"""The measured tolerance of tests/helpers.py can fail: a bug far smaller than the old fixed
bounds (1e-5 on logits, 1e-4 on gradients) is caught, on a tiny transformers Qwen3."""

import pytest
import torch

from models.qwen import load
from tests.helpers import assert_grads_match, assert_logits_match, hf_model, random_ids, save_hf_model


@pytest.fixture
def pair(tmp_path):
    ref = hf_model("qwen3", tie_word_embeddings=False)
    return ref, load(save_hf_model(ref, tmp_path / "ckpt"), dtype=torch.float32)


# Measured moves of the logits (max_rel_err): the final norm scaled by 1 + 1e-5, 9.8e-6 (the old
# fixed 1e-5 let it through); one q_norm by 1 + 1e-4, 3.4e-5; an RMSNorm epsilon of 1e-5 for
# Qwen's 1e-6, 7.5e-3. The floor here is ~4e-7, so 8 floors are ~3e-6.
BUGS = {
    "final norm off by 1e-5": lambda m: m.model.norm.weight.mul_(1 + 1e-5),
    "one q_norm off by 1e-4": lambda m: m.model.layers[1].self_attn.q_norm.weight.mul_(1 + 1e-4),
    "rms eps 1e-5 for 1e-6": lambda m: setattr(m.model.layers[0].input_layernorm, "eps", 1e-5),
}


def test_the_unperturbed_model_passes(pair):
    ref, ours = pair
    ids = random_ids(3, 29)
    with torch.no_grad():
        assert_logits_match(ours(ids), ref, ids)


@pytest.mark.parametrize("bug", sorted(BUGS))
def test_a_tiny_bug_fails_the_logits_bound(pair, bug):
    ref, ours = pair
    ids = random_ids(3, 29)
    with torch.no_grad():
        BUGS[bug](ours)
        with pytest.raises(AssertionError, match="more than 8 x its own fp32-vs-float64 error"):
            assert_logits_match(ours(ids), ref, ids)


def test_a_tiny_bug_fails_the_gradient_bound(pair):
    ref, ours = pair
    ref.train(), ours.train()
    ids = random_ids(2, 21, seed=1)
    with torch.no_grad():
        ours.model.layers[0].mlp.down_proj.weight.mul_(1 + 2e-5)   # gradients ~2e-5 off: the old 1e-4 passed it
    with pytest.raises(AssertionError, match="more than 8 x"):
        assert_grads_match(ours, ref, ids, labels=ids)
