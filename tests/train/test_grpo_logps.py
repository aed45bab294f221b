"""train.grpo.completion_logps: per-token log-probs and entropies of completion tokens through
our chunked head, against log_softmax(transformers' logits / T) on the same tiny random Qwen2
(values and parameter gradients, floors from its float64 twin), against TRL 1.16's own fused
head (what GRPOTrainer scores completions with), and the head never sees more than one chunk."""

from __future__ import annotations

import pytest
import torch

from models.qwen import load
from tests.helpers import assert_close_to_reference, assert_grads_close, float64_twin, random_ids, tiny_checkpoint
from train.grpo import completion_logps

P, C, T = 5, 6, 0.7


def batch():
    ids = random_ids(3, P + C, seed=4)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0           # a left-padded prompt
    mask[1, P + 3:] = 0       # a completion that stopped early
    mask[2, P + 1:] = 0
    return ids, mask


def reference(hf, ids, mask):
    """log_softmax(logits / T) at the completion positions, and the entropy there; 0 off the mask."""
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # our left-padding positions, given to transformers
    logits = hf(ids, attention_mask=mask, position_ids=positions).logits[:, P - 1:-1] / T
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, ids[:, P:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    keep = mask[:, P:].to(logp.dtype)
    return logp * keep, entropy * keep


@pytest.mark.parametrize("chunk_tokens", [4, 256])
def test_completion_logps_match_transformers_log_softmax(tmp_path, chunk_tokens):
    path, hf = tiny_checkpoint(tmp_path / "tiny", tie_word_embeddings=False, seed=2)
    ours = load(path, dtype=torch.float32)
    twin = float64_twin(hf)
    ids, mask = batch()
    g = torch.Generator().manual_seed(0)
    w_logp, w_ent = torch.randn(3, C, generator=g), torch.randn(3, C, generator=g)
    rows_seen = []
    hook = ours.lm_head.register_forward_hook(lambda m, args, out: rows_seen.append(args[0].shape[0]))
    logp, ent = completion_logps(ours, ids, mask, P, T, chunk_tokens=chunk_tokens)
    hook.remove()
    assert max(rows_seen) <= chunk_tokens and sum(rows_seen) == int(mask[:, P:].sum()), "one chunk at a time"
    ref = [reference(m, ids, mask) for m in (hf, twin)]
    assert logp.shape == ent.shape == (3, C)
    assert_close_to_reference(logp, ref[0][0], ref[1][0], what="log-probs")
    assert_close_to_reference(ent, ref[0][1], ref[1][1], what="entropies")
    assert torch.equal(logp[1, 3:], torch.zeros(3)), "0 off the completion mask"
    for out, model in [((logp, ent), None), (ref[0], hf), (ref[1], twin)]:
        ((out[0] * w_logp.to(out[0])).sum() + (out[1] * w_ent.to(out[1])).sum()).backward()
    assert_grads_close(ours, hf, twin)


def test_no_grad_and_bad_arguments(tmp_path):
    path, _ = tiny_checkpoint(tmp_path / "tiny", seed=1)
    ours = load(path, dtype=torch.float32)
    ids, mask = batch()
    with torch.no_grad():
        logp, _ = completion_logps(ours, ids, mask, P)
    assert not logp.requires_grad and (logp <= 0).all()
    with pytest.raises(ValueError, match="n_prompt=0"):
        completion_logps(ours, ids, mask, 0)
    with pytest.raises(ValueError, match="temperature"):
        completion_logps(ours, ids, mask, P, temperature=0.0)


def test_completion_logps_match_trl_fused_head(tmp_path):
    pytest.importorskip("trl")
    from trl.trainer.utils import add_fused_lm_head

    path, hf = tiny_checkpoint(tmp_path / "tiny", tie_word_embeddings=False, seed=5)
    ours = load(path, dtype=torch.float32)
    twin = float64_twin(hf)
    ids, mask = batch()
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    # GRPOTrainer._get_per_token_logps_and_entropies: labels = ids off the mask and the prompt -100,
    # log-probs and entropies of the last C positions of the fused head's output
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :P] = -100
    trl = []
    for model in (hf, twin):
        add_fused_lm_head(model, temperature=T, outputs=("log_probs", "entropy"))
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, labels=labels, fused_lm_head=True)
        trl.append((out.log_probs[:, -C:], out.entropy[:, -C:]))
    with torch.no_grad():
        logp, ent = completion_logps(ours, ids, mask, P, T)
    assert_close_to_reference(logp, trl[0][0], trl[1][0], what="log-probs vs TRL")
    assert_close_to_reference(ent, trl[0][1], trl[1][1], what="entropies vs TRL")


def test_grpo_step_on_lora_adapters(tmp_path):
    """A GRPO loss over completion_logps with LoRA: the reference is the model with its adapters
    disabled; the gradient reaches the adapters and nothing else."""
    import lora
    from tests.lora.conftest import randomise_adapters
    from train.grpo import grpo_loss

    path, _ = tiny_checkpoint(tmp_path / "tiny", seed=6)
    model = load(path, dtype=torch.float32)
    lora.inject(model, r=4, alpha=8)
    randomise_adapters(model, seed=1, std=0.1)
    ids, mask = batch()
    with torch.no_grad(), lora.disable_adapters(model):
        ref, _ = completion_logps(model, ids, mask, P, T)
    logp, ent = completion_logps(model, ids, mask, P, T)
    assert (logp - ref).abs().max() > 0, "the adapters change the policy"
    completion_mask = mask[:, P:]
    loss, metrics = grpo_loss(logp, None, ref, torch.tensor([1.0, -0.5, 0.3]), completion_mask, beta=0.1,
                              num_items_in_batch=int(completion_mask.sum()), entropies=ent)
    loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in n for n in trainable)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if n in trainable and "lora_B" in n)
    assert metrics["kl"] > 0 and metrics["entropy"] > 0
