"""A PEFT adapter in Qwen-7B v1 names (transformer.h.{i}.attn.c_attn, mlp.w1, ...) loads onto
our Qwen2-named model and gives the logits PEFT gives for the same update in Qwen2 names."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora
from tests.helpers import max_rel_err, random_ids
from tests.lora.conftest import load_hf, load_ours

V1 = {"self_attn.o_proj": "attn.c_proj", "mlp.up_proj": "mlp.w1", "mlp.gate_proj": "mlp.w2",
      "mlp.down_proj": "mlp.c_proj"}


@pytest.mark.parametrize("dora", [False, True])
def test_v1_named_adapter(ckpt_dirs, tmp_path, dora):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=dora, task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(load_hf(ckpt_dirs[False]), cfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
        # A fused c_attn has one lora_A for q, k and v: make PEFT's three equal.
        for layer in pm.base_model.model.model.layers:
            a = layer.self_attn.q_proj.lora_A["default"].weight
            layer.self_attn.k_proj.lora_A["default"].weight.copy_(a)
            layer.self_attn.v_proj.lora_A["default"].weight.copy_(a)
    pm.eval()
    ids = random_ids(2, 9)
    with torch.no_grad():
        theirs = pm(input_ids=ids).logits
    pm.save_pretrained(str(tmp_path / "qwen2"))

    # Rewrite the adapter in v1 names.
    t = load_file(str(tmp_path / "qwen2" / "adapter_model.safetensors"))
    v1 = {}
    pat = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(.+?)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$")
    for key, value in t.items():
        i, module, part = pat.match(key).groups()
        if module in V1:
            v1[f"base_model.model.transformer.h.{i}.{V1[module]}.{part}"] = value
    for i in range(2):
        get = lambda m, part: t[f"base_model.model.model.layers.{i}.self_attn.{m}.{part}"]
        c = f"base_model.model.transformer.h.{i}.attn.c_attn."
        v1[c + "lora_A.weight"] = get("q_proj", "lora_A.weight")
        v1[c + "lora_B.weight"] = torch.cat([get(m, "lora_B.weight") for m in ("q_proj", "k_proj", "v_proj")])
        if dora:
            v1[c + "lora_magnitude_vector"] = torch.cat([get(m, "lora_magnitude_vector") for m in ("q_proj", "k_proj", "v_proj")])
    out = tmp_path / "v1"
    out.mkdir()
    save_file(v1, str(out / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "qwen2" / "adapter_config.json").read_text())
    config["target_modules"] = ["c_attn", "c_proj", "w1", "w2"]
    (out / "adapter_config.json").write_text(json.dumps(config))

    model = lora.load(load_ours(ckpt_dirs[False]), out)
    with torch.no_grad():
        # observed 0.0 (the same weights and kernels; 1e-5 leaves room for another CPU's kernel choice)
        assert max_rel_err(model(ids), theirs) < 1e-5
    # Saved back in Qwen2 names that PEFT reads on the transformers Qwen2 model.
    assert sorted(lora.config_of(model).target_modules) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


def test_v1_c_attn_with_wrong_rows(ckpt_dirs, tmp_path):
    out = tmp_path / "bad"
    out.mkdir()
    save_file({"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": torch.zeros(2, 48),
               "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight": torch.zeros(48, 2)},
              str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                                                        "target_modules": ["c_attn"]}))
    with pytest.raises(lora.AdapterError, match=r"c_attn\.lora_B\.weight' has 48 rows, expected 96"):
        lora.load(load_ours(ckpt_dirs[False]), out)
