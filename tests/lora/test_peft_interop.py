"""Interop with the real `peft` package, both ways, on tiny random Qwen2 models:
our saved adapter loaded by PeftModel.from_pretrained onto the transformers model gives our
logits; an adapter created and trained with PEFT loads into our model and gives PEFT's logits."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open

import lora
from tests.helpers import assert_close_to_reference, assert_logits_match, float64_twin, max_rel_err, random_ids
from tests.lora.conftest import load_hf, load_ours, randomise_adapters

OURS = {
    "lora": dict(r=4, alpha=8),
    "rslora": dict(r=4, alpha=8, rslora=True),
    "dora": dict(r=4, alpha=8, dora=True),
    "subset": dict(r=2, alpha=4, targets=["q_proj", "v_proj", "down_proj"]),
    "regex": dict(r=2, alpha=2, targets=r"model\.layers\.1\.mlp\..*"),
    "copies": dict(r=4, alpha=8, dora=True, modules_to_save=["lm_head"]),
}


def _peft_model(hf, adapter_dir):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(hf, str(adapter_dir)).eval()


@pytest.mark.parametrize(
    "variant, tied", [(v, t) for v in OURS for t in (True, False) if not (t and v in ("subset", "regex"))]
)
def test_ours_to_peft(ckpt_dirs, tmp_path, tied, variant):
    model = load_ours(ckpt_dirs[tied])
    lora.inject(model, **OURS[variant])
    randomise_adapters(model, seed=7)
    ids = random_ids(2, 10, seed=1)
    with torch.no_grad():
        ours = model(ids)
    lora.save(model, tmp_path / "adapter")
    peft_model = _peft_model(load_hf(ckpt_dirs[tied]), tmp_path / "adapter")
    with torch.no_grad():
        with peft_model.disable_adapter():
            base = peft_model(ids).logits
    assert max_rel_err(ours, base) > 1e-2  # the adapter is not a no-op
    assert_logits_match(ours, peft_model, ids)


def test_saved_files_are_peft_format(ckpt_dirs, tmp_path):
    model = load_ours(ckpt_dirs[False])
    lora.inject(model, r=4, alpha=8, dropout=0.05, dora=True, rslora=True, modules_to_save=["lm_head"])
    lora.save(model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["bias"] == "none"
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["lora_dropout"] == 0.05
    assert cfg["use_rslora"] is True and cfg["use_dora"] is True
    assert sorted(cfg["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert cfg["modules_to_save"] == ["lm_head"]
    assert cfg["base_model_name_or_path"] == str(ckpt_dirs[False])
    # The config is what peft itself reads.
    from peft import LoraConfig

    pc = LoraConfig.from_pretrained(str(tmp_path / "a"))
    assert pc.r == 4 and pc.use_dora and pc.use_rslora and pc.modules_to_save == ["lm_head"]
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    p = "base_model.model.model.layers.0."
    assert shapes[p + "self_attn.k_proj.lora_A.weight"] == (4, 48)
    assert shapes[p + "self_attn.k_proj.lora_B.weight"] == (24, 4)  # GQA: 2 kv heads x 12
    assert shapes[p + "self_attn.k_proj.lora_magnitude_vector"] == (24,)
    assert shapes[p + "mlp.down_proj.lora_A.weight"] == (4, 88)
    assert shapes["base_model.model.lm_head.weight"] == (320, 48)
    assert len(shapes) == 14 * 3 + 1


PEFT_CONFIGS = {
    "lora": dict(target_modules="all-linear"),
    "rslora": dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], use_rslora=True),
    "dora": dict(target_modules="all-linear", use_dora=True),
    "dora+rslora+dropout": dict(target_modules=["gate_proj", "up_proj", "down_proj"], use_dora=True,
                                use_rslora=True, lora_dropout=0.1),
    "copies": dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
}


def _train_peft(ckpt, cfg_kwargs, out_dir, steps=3):
    """Create an adapter with PEFT, train it a few AdamW steps (B moves off 0), save it."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    hf = load_hf(ckpt)
    cfg = LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", **cfg_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(hf, cfg)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=2e-2)
    pm.train()
    for step in range(steps):
        ids = random_ids(2, 12, seed=10 + step)
        pm(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    pm.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(out_dir))
    return pm


# Tied + modules_to_save from PEFT: see test_peft_tied_copies_untie.
@pytest.mark.parametrize(
    "variant, tied", [(v, t) for v in PEFT_CONFIGS for t in (True, False) if not (t and v == "copies")]
)
def test_peft_to_ours(ckpt_dirs, tmp_path, tied, variant):
    pm = _train_peft(ckpt_dirs[tied], PEFT_CONFIGS[variant], tmp_path / "adapter")
    ids = random_ids(2, 10, seed=2)
    with torch.no_grad():
        theirs = pm(input_ids=ids).logits
    model = lora.load(load_ours(ckpt_dirs[tied]), tmp_path / "adapter")
    model.eval()
    with torch.no_grad():
        ours = model(ids)
        with lora.disable_adapters(model):
            base = model(ids)
    assert max_rel_err(theirs, base) > 1e-3
    assert_logits_match(ours, pm, input_ids=ids)
    # And back: our save of the loaded adapter is read by PEFT with the same result.
    lora.save(model, tmp_path / "again")
    again = _peft_model(load_hf(ckpt_dirs[tied]), tmp_path / "again")
    with torch.no_grad():
        assert_logits_match(again(ids).logits, pm, input_ids=ids)
    # Trainable after load: the same parameters PEFT trains.
    peft_trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert lora.summary(model).trainable == peft_trainable


def test_peft_tied_copies_untie(ckpt_dirs, tmp_path):
    """PEFT trains separate copies of a tied embedding and head; loading it unties, loudly."""
    pm = _train_peft(ckpt_dirs[True], dict(target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]),
                     tmp_path / "adapter")
    ids = random_ids(2, 10, seed=3)
    model = load_ours(ckpt_dirs[True])
    with pytest.warns(UserWarning, match="untied"):
        lora.load(model, tmp_path / "adapter")
    with torch.no_grad():
        assert_logits_match(model(ids), pm, input_ids=ids)
    with pytest.warns(UserWarning, match="untied"):
        lora.merge(model)
    assert not model.is_tied and not model.config.tie_word_embeddings
    with torch.no_grad():
        assert_logits_match(model(ids), pm, input_ids=ids)


def test_peft_adapter_on_merged_model_then_merge_matches_peft_merge(ckpt_dirs, tmp_path):
    """Our merge of a PEFT-trained DoRA adapter equals peft's merge_and_unload weights."""
    pm = _train_peft(ckpt_dirs[False], dict(target_modules="all-linear", use_dora=True), tmp_path / "adapter")
    model = lora.merge(lora.load(load_ours(ckpt_dirs[False]), tmp_path / "adapter"))
    ref64 = float64_twin(pm).merge_and_unload().state_dict()
    ref = pm.merge_and_unload().state_dict()
    for k, v in model.state_dict().items():
        if k.endswith("inv_freq"):
            continue
        assert_close_to_reference(v, ref[k], ref64[k], what=k)


def test_qwen3_both_ways(tmp_path):
    """Qwen3: q/k norms and head_dim != hidden/heads (q_proj is 48 -> 80)."""
    from tests.helpers import tiny_checkpoint

    ckpt, _ = tiny_checkpoint(tmp_path / "qwen3", kind="qwen3")
    model = lora.inject(load_ours(ckpt), r=4, alpha=8, dora=True)
    randomise_adapters(model, seed=5)
    ids = random_ids(2, 9)
    lora.save(model, tmp_path / "ours")
    with torch.no_grad():
        assert_logits_match(model(ids), _peft_model(load_hf(ckpt), tmp_path / "ours"), ids)
    pm = _train_peft(ckpt, dict(target_modules="all-linear", use_rslora=True), tmp_path / "peft")
    with torch.no_grad():
        assert_logits_match(lora.load(load_ours(ckpt), tmp_path / "peft")(ids), pm, input_ids=ids)
