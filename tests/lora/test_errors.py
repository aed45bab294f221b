"""lora.save / lora.load error cases: every bad input names the file, key or field."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora
from lora import AdapterError
from tests.helpers import random_ids, tiny_checkpoint
from tests.lora.conftest import load_ours, randomise_adapters


@pytest.fixture()
def adapter(ckpt_dirs, tmp_path):
    model = lora.inject(load_ours(ckpt_dirs[False]), r=4, alpha=8, dora=True)
    randomise_adapters(model)
    return lora.save(model, tmp_path / "adapter")


def _rewrite_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def test_missing_directory_and_files(ckpt_dirs, tmp_path, adapter):
    model = load_ours(ckpt_dirs[False])
    with pytest.raises(AdapterError, match="nowhere.*not found"):
        lora.load(model, tmp_path / "nowhere")
    (adapter / "adapter_model.safetensors").rename(tmp_path / "moved.safetensors")
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors: not found"):
        lora.load(model, adapter)
    (adapter / "adapter_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(AdapterError, match="pickle"):
        lora.load(model, adapter)
    (adapter / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match=r"adapter_config\.json: not found"):
        lora.load(model, adapter)
    assert not lora.has_adapters(model)


def test_corrupt_files(ckpt_dirs, adapter):
    model = load_ours(ckpt_dirs[False])
    (adapter / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(AdapterError, match="not a readable safetensors"):
        lora.load(model, adapter)
    (adapter / "adapter_config.json").write_text("{ not json")
    with pytest.raises(AdapterError, match="adapter_config.json:1: malformed JSON"):
        lora.load(model, adapter)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(peft_type="IA3"), "peft_type 'IA3'"),
        (dict(bias="all"), "bias 'all'"),
        (dict(rank_pattern={"q_proj": 8}), "rank_pattern"),
        (dict(r="four"), "'r'"),
        (dict(r=None), "missing field 'r'"),
    ],
)
def test_unsupported_config(ckpt_dirs, adapter, change, match):
    _rewrite_config(adapter, **change)
    with pytest.raises(AdapterError, match=match):
        lora.load(load_ours(ckpt_dirs[False]), adapter)


def test_key_for_missing_module(ckpt_dirs, adapter):
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"
    tensors[key] = torch.zeros(4, 48)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=r"layers\.7\.self_attn\.q_proj\.lora_A\.weight.*matches no module"):
        lora.load(load_ours(ckpt_dirs[False]), adapter)


def test_key_that_is_no_adapter_tensor(ckpt_dirs, adapter):
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    tensors["base_model.model.model.norm.weight"] = torch.ones(48)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=r"model\.norm\.weight.*matches no LoRA module"):
        lora.load(load_ours(ckpt_dirs[False]), adapter)


def test_missing_part(ckpt_dirs, adapter):
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    del tensors["base_model.model.model.layers.1.mlp.up_proj.lora_magnitude_vector"]
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=r"up_proj.*missing.*lora_magnitude_vector"):
        lora.load(load_ours(ckpt_dirs[False]), adapter)


def test_adapter_for_a_different_shape(adapter, tmp_path):
    other, _ = tiny_checkpoint(tmp_path / "wide", hidden_size=64, intermediate_size=96)
    model = load_ours(other)
    with pytest.raises(AdapterError, match=r"layers\.0\.self_attn\.q_proj\.lora_A\.weight' has shape \(4, 48\), expected \(4, 64\)"):
        lora.load(model, adapter)
    assert not lora.has_adapters(model)  # checked before anything was injected


def test_adapter_for_a_different_model_structure(adapter, tmp_path):
    deeper, _ = tiny_checkpoint(tmp_path / "one_layer", num_hidden_layers=1)
    with pytest.raises(AdapterError, match=r"layers\.1\..*matches no module"):
        lora.load(load_ours(deeper), adapter)


def test_loading_into_a_model_with_conflicting_adapter(ckpt_dirs, adapter):
    model = lora.inject(load_ours(ckpt_dirs[False]), r=8, dora=True)
    with pytest.raises(AdapterError, match="r=4.*r=8"):
        lora.load(model, adapter)
    model = lora.inject(load_ours(ckpt_dirs[False]), r=4, alpha=8, dora=True, targets=["q_proj"])
    with pytest.raises(AdapterError, match="holds no adapter in this model"):
        lora.load(model, adapter)


def test_loading_into_a_matching_model_replaces_weights(ckpt_dirs, adapter):
    """Resume path: load into a model that already has the same adapter layout."""
    reference = lora.load(load_ours(ckpt_dirs[False]), adapter)
    model = lora.inject(load_ours(ckpt_dirs[False]), r=4, alpha=8, dora=True)
    lora.load(model, adapter)
    ids = random_ids(1, 6)
    assert torch.equal(model(ids), reference(ids))


def test_save_without_adapter(ckpt_dirs, tmp_path):
    with pytest.raises(ValueError, match="no LoRA adapter"):
        lora.save(load_ours(ckpt_dirs[False]), tmp_path / "x")


@pytest.mark.parametrize("poison", ["nan", "inf", "int32"])
def test_non_finite_or_integer_adapter_weights_are_refused(ckpt_dirs, adapter, poison):
    """A NaN would spread into every merged weight it touches; an int32 lora_B would be cast,
    silently erasing it. Both are refused at load, naming the tensor."""
    file = adapter / "adapter_model.safetensors"
    tensors = load_file(file)
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    if poison == "int32":
        tensors[key] = tensors[key].to(torch.int32)
    else:
        tensors[key][0, 0] = float(poison)
    save_file(tensors, file)
    model = load_ours(ckpt_dirs[False])
    with pytest.raises(AdapterError, match=rf"{key}.*(NaN or Inf|int32, expected a floating-point)"):
        lora.load(model, adapter)
    assert not lora.has_adapters(model)


@pytest.mark.parametrize("targets, needle", [
    (["q_proj", "wq"], "target_modules entry 'wq' names no module"),
    (["../../etc/passwd"], "is not a module name"),
    ("model\\.layers\\.9\\..*", "matches no module"),
])
def test_target_modules_must_name_modules_of_the_model(ckpt_dirs, adapter, targets, needle):
    """As PEFT refuses target_modules that match nothing in the base model."""
    _rewrite_config(adapter, target_modules=targets)
    model = load_ours(ckpt_dirs[False])
    with pytest.raises(AdapterError, match=needle):
        lora.load(model, adapter)


@pytest.mark.parametrize("training", [False, True])
def test_inject_and_load_keep_the_model_mode(ckpt_dirs, adapter, training):
    """A model in eval mode stays in eval mode when adapters arrive: an adapter with dropout gives
    the same output twice. (PEFT's PeftModel.from_pretrained leaves an eval model all in eval mode
    too; its get_peft_model mixes modes, which is what we do not copy.)"""
    peft = pytest.importorskip("peft")
    from tests.lora.conftest import load_hf

    ids = random_ids(1, 12)
    for add in (lambda m: lora.inject(m, r=4, alpha=8, dropout=0.5), lambda m: lora.load(m, adapter)):
        model = load_ours(ckpt_dirs[False]).train(training)
        add(model)
        assert {m.training for m in model.modules()} == {training}
        if not training:
            with torch.no_grad():
                assert torch.equal(model(ids), model(ids))
    if not training:
        loaded = peft.PeftModel.from_pretrained(load_hf(ckpt_dirs[False]).eval(), adapter)
        assert {m.training for m in loaded.modules()} == {False}   # the reference
