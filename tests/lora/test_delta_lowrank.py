"""extract_lora (Eckart-Young optimum, PEFT loads it with matching logits) and delta_report."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from lora.delta import DeltaError, delta_report, diff, extract_lora
from tests.helpers import max_rel_err, random_ids
from tests.lora.test_delta import EMBED, family, group_of, load_sd

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _linear_keys(sd):
    return [k for k in sd if k.startswith("model.layers.") and k.split(".")[-2] in LINEARS and k.endswith("weight")]


@pytest.mark.parametrize("source", ["pair", "delta_dir"])
def test_extract_lora_reaches_the_eckart_young_optimum(tmp_path, source):
    paths, _ = family(tmp_path)
    b, c = load_sd(paths["base"]), load_sd(paths["chat"])
    delta = (paths["chat"], paths["base"]) if source == "pair" else diff(paths["chat"], paths["base"], tmp_path / "d")
    r = 5
    res = extract_lora(delta, r, tmp_path / "adapter")
    ad = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == r and cfg["lora_alpha"] == r and cfg["peft_type"] == "LORA"
    assert sorted(cfg["target_modules"]) == sorted(LINEARS)
    reported = {m["module"]: m for m in res.modules}
    keys = _linear_keys(b)
    assert len(ad) == 2 * len(keys) == 2 * len(reported)
    for k in keys:
        module = k[: -len(".weight")]
        A = ad[f"base_model.model.{module}.lora_A.weight"].double()
        B = ad[f"base_model.model.{module}.lora_B.weight"].double()
        D = c[k].double() - b[k].double()
        assert A.shape == (r, D.shape[1]) and B.shape == (D.shape[0], r)
        s = torch.linalg.svdvals(D)
        optimum = s[r:].pow(2).sum().sqrt().item()
        err = (D - B @ A).norm().item()
        assert optimum > 1e-3 * D.norm().item()  # a real truncation, not a trivial zero error
        assert err == pytest.approx(optimum, rel=1e-4), k
        assert reported[module]["fro_error"] == pytest.approx(optimum, rel=1e-4)
        assert reported[module]["retained_energy"] == pytest.approx((s[:r].pow(2).sum() / s.pow(2).sum()).item(), rel=1e-5)
    for layer in res.layers:  # per-layer energy = kept / total over the layer's modules
        ks = [k for k in keys if k.startswith(f"model.layers.{layer['layer']}.")]
        kept = sum(torch.linalg.svdvals(c[k].double() - b[k].double())[:r].pow(2).sum().item() for k in ks)
        total = sum((c[k].double() - b[k].double()).pow(2).sum().item() for k in ks)
        assert layer["retained_energy"] == pytest.approx(kept / total, rel=1e-5)
    dropped = {d["tensor"] for d in res.not_representable}
    assert EMBED in dropped and "model.layers.0.self_attn.q_proj.bias" in dropped
    assert json.loads((tmp_path / "adapter" / "extraction_report.json").read_text())["r"] == r


def test_extracted_adapter_loads_in_peft_with_matching_logits(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    paths, models = family(tmp_path)
    r = 4
    extract_lora((paths["chat"], paths["base"]), r, tmp_path / "adapter")
    base_hf = AutoModelForCausalLM.from_pretrained(paths["base"], dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base_hf, tmp_path / "adapter")
    # Reference: base + best rank-r approximation of every linear delta, by an independent SVD.
    b, c = load_sd(paths["base"]), load_sd(paths["chat"])
    ref = copy.deepcopy(models["base"])
    new = {}
    for k in _linear_keys(b):
        U, S, Vh = torch.linalg.svd(c[k].double() - b[k].double(), full_matrices=False)
        new[k] = (b[k].double() + U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]).float()
    ref.load_state_dict(new, strict=False)
    ids = random_ids(2, 9)
    with torch.no_grad():
        got, want = peft_model(ids).logits, ref(ids).logits
        # observed 3.6e-7 (28x margin)
        assert max_rel_err(got, want) <= 1e-5
        assert max_rel_err(models["base"](ids).logits, want) > 1e-3  # the adapter does change the model


def test_extract_lora_targets_and_errors(tmp_path):
    paths, _ = family(tmp_path)
    res = extract_lora((paths["chat"], paths["base"]), 3, tmp_path / "a", targets=["q_proj", "v_proj"])
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["q_proj", "v_proj"] and len(res.modules) == 4
    assert "rank 3" in res.table()
    with pytest.raises(DeltaError, match="r=49 exceeds min"):
        extract_lora((paths["chat"], paths["base"]), 49, tmp_path / "b")
    with pytest.raises(DeltaError, match="'lm_head' is not a decoder linear"):
        extract_lora((paths["chat"], paths["base"]), 2, tmp_path / "b", targets=["lm_head"])
    with pytest.raises(DeltaError, match="not a delta checkpoint"):
        extract_lora(paths["chat"], 2, tmp_path / "b")
    with pytest.raises(DeltaError, match="positive integer"):
        extract_lora((paths["chat"], paths["base"]), 0, tmp_path / "b")


def test_randomized_method_is_close_to_the_optimum(tmp_path):
    paths, _ = family(tmp_path)
    res_exact = extract_lora((paths["chat"], paths["base"]), 8, tmp_path / "e")
    res_rand = extract_lora((paths["chat"], paths["base"]), 8, tmp_path / "r", method="randomized")
    for a, b in zip(res_exact.modules, res_rand.modules):
        assert b["fro_error"] >= a["fro_error"] * (1 - 1e-5)  # never better than the optimum
        assert b["fro_error"] <= a["fro_error"] * 1.10


# ---------------------------------------------------------------------- report
def test_delta_report_matches_norms_of_the_state_dicts(tmp_path):
    paths, _ = family(tmp_path)
    rep = delta_report(paths["chat"], paths["base"])
    b, c = load_sd(paths["base"]), load_sd(paths["chat"])
    rows = {t["tensor"]: t for t in rep.tensors}
    assert set(rows) == set(b)
    for k in b:
        d = (c[k].double() - b[k].double()).norm().item()
        assert rows[k]["delta_norm"] == pytest.approx(d, rel=1e-9)
        assert rows[k]["rel"] == pytest.approx(d / b[k].double().norm().item(), rel=1e-9)
        assert rows[k]["group"] == group_of(k)
    layer0 = next(r for r in rep.by_layer() if r["layer"] == 0)
    ks = [k for k in b if k.startswith("model.layers.0.") and group_of(k) == "mlp"]
    want = math.sqrt(sum((c[k].double() - b[k].double()).pow(2).sum().item() for k in ks)
                     / sum(b[k].double().pow(2).sum().item() for k in ks))
    assert layer0["mlp"] == pytest.approx(want, rel=1e-9)
    table = rep.table()
    assert "attention" in table and "embeddings" in table and len(table.splitlines()) == 2 + 2 + 2
    # the same numbers from a stored delta
    d = diff(paths["chat"], paths["base"], tmp_path / "delta")
    rep2 = delta_report(d, paths["base"])
    for t in rep2.tensors:
        assert t["rel"] == pytest.approx(rows[t["tensor"]]["rel"], rel=1e-6)
    json.loads(rep.to_json())


def test_delta_report_plot_needs_matplotlib(tmp_path):
    paths, _ = family(tmp_path)
    rep = delta_report(paths["chat"], paths["base"])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(DeltaError, match="matplotlib is not installed"):
            rep.plot(tmp_path / "p.png")
    else:
        assert rep.plot(tmp_path / "p.png").stat().st_size > 0
