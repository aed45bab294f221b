"""merge: merged vs adapter logits, tied/untied, DoRA, modules_to_save; the merged model is a
plain checkpoint that transformers loads with the same logits; disable_adapters is the base."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora
from tests.helpers import assert_same_function, float64_twin, max_rel_err, random_ids
from tests.lora.conftest import load_hf, load_ours, randomise_adapters

VARIANTS = {
    "lora": dict(r=4, alpha=8),
    "rslora": dict(r=4, alpha=8, rslora=True),
    "dora": dict(r=4, alpha=8, dora=True),
    "dora+copies": dict(r=4, alpha=8, dora=True, modules_to_save=["lm_head"]),
}


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_merged_logits_equal_adapter_logits(ckpt_dirs, tied, variant):
    torch.manual_seed(0)  # lora_A's init draws from the global RNG: no dependence on test order
    model = load_ours(ckpt_dirs[tied])
    keys_before = set(model.state_dict())
    base_logits = model(random_ids(2, 9))
    lora.inject(model, **VARIANTS[variant])
    randomise_adapters(model)
    ids = random_ids(2, 9)
    with torch.no_grad():
        adapted, adapted64 = model(ids), float64_twin(model)(ids)
    assert max_rel_err(adapted, base_logits) > 1e-2  # the adapter does something
    lora.merge(model)
    with torch.no_grad():
        merged, merged64 = model(ids), float64_twin(model)(ids)
    # Both are fp32 evaluations of one function: x·(W + s·B·A) against x·W + s·(x·A)·B, with
    # adapters randomised to std 0.2 (deltas larger than W): a summation-order difference, bounded
    # by 8 x the sum of the two models' own fp32-vs-float64 errors (observed: up to 0.13 of it;
    # the fixed 5e-5 it replaces saw 2.8e-5 over 20 seeds); a wrong merge (a missing scale, a
    # transposed B·A) is off by more than 1e-2.
    assert_same_function(merged, merged64, adapted, adapted64, what="merged vs unmerged")
    assert not lora.has_adapters(model)
    assert set(model.state_dict()) == keys_before
    assert all(type(m) is not lora.LoRALinear for m in model.modules())
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)
    assert model.is_tied == tied
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    # Requires-grad flags are back to what they were before inject.
    assert all(p.requires_grad for p in model.parameters())


def test_merged_model_saves_as_plain_checkpoint(ckpt_dirs, tmp_path):
    from models.qwen import save

    model = load_ours(ckpt_dirs[True])
    lora.inject(model, r=4, alpha=16, dora=True, modules_to_save=["embed_tokens"])
    randomise_adapters(model, seed=3)
    ids = random_ids(2, 8)
    with torch.no_grad():
        adapted = model(ids)
    with pytest.raises(ValueError, match="merge"):
        save(model, tmp_path / "refused")  # the checkpoint writer refuses unmerged adapters
    lora.merge(model)
    save(model, tmp_path / "merged")
    hf = load_hf(tmp_path / "merged")  # the reference reads it
    assert hf.config.tie_word_embeddings
    with torch.no_grad():
        # observed 1.7e-7 (60x margin)
        assert max_rel_err(hf(ids).logits, adapted) < 1e-5


def test_disable_adapters_gives_the_base(ckpt_dirs):
    model = load_ours(ckpt_dirs[True])
    ids = random_ids(2, 7)
    with torch.no_grad():
        base = model(ids)
    lora.inject(model, r=4, dora=True, modules_to_save=["lm_head"])
    randomise_adapters(model)
    with torch.no_grad():
        adapted = model(ids)
        with lora.disable_adapters(model):
            assert torch.equal(model(ids), base)
        assert torch.equal(model(ids), adapted)
        lora.set_adapters_enabled(model, False)
        assert torch.equal(model(ids), base)
        lora.set_adapters_enabled(model, True)
        assert torch.equal(model(ids), adapted)


def test_merge_without_adapters_is_an_error(ckpt_dirs):
    with pytest.raises(ValueError, match="no LoRA adapter"):
        lora.merge(load_ours(ckpt_dirs[False]))


def test_merge_casts_once_from_fp32(ckpt_dirs):
    """bf16 base: merged weight == round_bf16(W32 + scale·B·A in fp32), not a bf16 sum."""
    model = load_ours(ckpt_dirs[False]).to(torch.bfloat16)
    lora.inject(model, r=4, alpha=8, targets=["q_proj"])
    randomise_adapters(model)
    layer = model.model.layers[0].self_attn.q_proj
    W, A, B = layer.base_layer.weight.float(), layer.lora_A.weight, layer.lora_B.weight
    expected = (W + 2.0 * (B @ A)).to(torch.bfloat16)
    naive = layer.base_layer.weight + (2.0 * (B @ A)).to(torch.bfloat16)  # two roundings
    assert not torch.equal(naive, expected)  # so the check below can tell them apart
    lora.merge(model)
    merged = model.model.layers[0].self_attn.q_proj.weight
    assert merged.dtype == torch.bfloat16
    assert torch.equal(merged, expected)


@pytest.mark.parametrize("copies", [None, ["lm_head"]])
def test_save_refuses_a_model_with_adapters_naming_the_tensor_and_the_remedy(ckpt_dirs, tmp_path, copies):
    """models.qwen.save writes only the tensors of the checkpoint layout: an adapter's (or a
    trainable copy's) is refused by name, pointing at lora.merge / lora.save; merged, it saves."""
    from models.qwen import load, save

    model = load_ours(ckpt_dirs[False])
    lora.inject(model, r=4, alpha=8, modules_to_save=copies)
    with pytest.raises(ValueError, match=r"model\.layers\.0\..*(lora_A|modules_to_save)\.weight is not a parameter "
                                         r"of a qwen2 checkpoint: merge adapters first \(lora\.merge"):
        save(model, tmp_path / "refused")
    with pytest.raises(ValueError, match=r"state_dict holds .*: pass the base model's tensors"):
        save(model, tmp_path / "refused", state_dict=model.state_dict())
    assert not (tmp_path / "refused").exists()
    save(model, tmp_path / "base", state_dict=lora.base_state_dict(model))
    lora.merge(model)
    save(model, tmp_path / "merged")
    assert set(load(tmp_path / "merged").state_dict()) == set(load(tmp_path / "base").state_dict())
