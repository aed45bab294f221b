"""QLoRA: LoRA over a Qwen loaded with quantize=quant.NF4Quantizer() (quant.NF4Linear bases)."""

from __future__ import annotations

import pytest
import torch

import lora
from quant import NF4Quantizer
from tests.helpers import max_rel_err, random_ids
from tests.lora.conftest import load_ours, randomise_adapters

quant = pytest.importorskip("quant")
if not hasattr(quant, "NF4Linear"):  # pragma: no cover - only while quant is being written
    pytest.skip("quant.NF4Linear not available", allow_module_level=True)


def load_nf4(path):
    from models.qwen import load

    return load(path, dtype=torch.float32, quantize=NF4Quantizer())


@pytest.mark.parametrize("order", ["checkpointing_first", "inject_first"])
def test_qlora_trains_only_adapters(ckpt_dirs, order):
    model = load_nf4(ckpt_dirs[True])
    assert isinstance(model.model.layers[0].self_attn.q_proj, quant.NF4Linear)
    keys_before = set(model.state_dict())
    if order == "checkpointing_first":
        model.enable_gradient_checkpointing(True)
    lora.inject(model, r=4, alpha=8, dora=True, dropout=0.1)
    if order == "inject_first":
        model.enable_gradient_checkpointing(True)
    sd = model.state_dict()
    assert keys_before <= set(sd)  # bnb keys (weight, weight.absmax, ...) unchanged
    assert "model.layers.0.self_attn.q_proj.weight.absmax" in sd
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in sd
    frozen = {k: v.clone() for k, v in sd.items() if "lora_" not in k}
    start_b = {k: v.clone() for k, v in sd.items() if k.endswith("lora_B.weight")}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(2):
        ids = random_ids(2, 8, seed=step)
        model(ids, labels=ids).backward()
        lora.check_gradients(model)
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    for k, v in frozen.items():
        assert torch.equal(after[k], v), k
    assert len(start_b) == 14 and all(not torch.equal(after[k], v) for k, v in start_b.items())


def test_qlora_adapter_merges_and_moves_to_16bit(ckpt_dirs, tmp_path):
    model = lora.inject(load_nf4(ckpt_dirs[False]), r=4, alpha=8, dora=True)
    randomise_adapters(model)
    ids = random_ids(2, 9)
    with torch.no_grad():
        adapted = model(ids)
    lora.save(model, tmp_path / "adapter")
    # Same keys as a 16-bit model: the adapter loads onto the original weights (the default
    # merge after QLoRA) ...
    full = lora.load(load_ours(ckpt_dirs[False]), tmp_path / "adapter")
    with torch.no_grad():
        # differs by the 4-bit rounding only: observed 0.033 (0.33 of the bound), a deterministic
        # elementwise quantisation, the same on every CPU (fp32 summation order: ~1e-6)
        assert max_rel_err(full(ids), adapted) < 0.1
    # ... and onto a fresh NF4 model it reproduces the QLoRA logits exactly.
    again = lora.load(load_nf4(ckpt_dirs[False]), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(again(ids), adapted)
    # Merging into the dequantised NF4 weights gives plain linears with the same logits.
    lora.merge(model)
    assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear
    with torch.no_grad():
        # merged vs unmerged over the same dequantised weights, fp32: observed 2.5e-7 (40x margin)
        assert max_rel_err(model(ids), adapted) < 1e-5
