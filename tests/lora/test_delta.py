"""lora.delta: diff / apply / instruction residual / task arithmetic on tiny random checkpoints.

References are closed forms computed here with plain torch (float64) on state dicts loaded
with safetensors from the files transformers wrote; never numbers lora.delta produced.
The closed forms are elementwise, in float64, rounded once to fp32; ours rounds once or twice, so
rtol=1e-6 / atol=1e-7 (8 fp32 ulps) is no summation-order bound: observed 0 to 1e-3 of it.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora.delta import DeltaError, apply, diff, instruction_residual, task_arithmetic
from tests.helpers import hf_model, max_rel_err, random_ids, save_hf_model

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


# ---------------------------------------------------------------------- helpers (imported by test_delta_*.py)
def perturbed(model, seed: int, amount: float = 0.05):
    """A copy of `model` with every parameter moved by amount * N(0, 1) * its std (tied stays tied)."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=g) * amount * (p.std() if p.numel() > 1 else 1.0))
    return out


def write_model(model, path: Path, dtype=torch.float32, shard=None, chat_files=False) -> Path:
    m = copy.deepcopy(model).to(dtype)
    kwargs = {"max_shard_size": shard} if shard else {}
    save_hf_model(m, path, **kwargs)
    if chat_files:
        (path / "tokenizer_config.json").write_text(json.dumps(
            {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE}))
        (path / "vocab.json").write_text("{}")
        (path / "merges.txt").write_text("#version: 0.2\n")
        gen = json.loads((path / "generation_config.json").read_text())
        gen.update(eos_token_id=[151645, 151643], temperature=0.7, top_p=0.8)
        (path / "generation_config.json").write_text(json.dumps(gen))
    return path


def family(tmp: Path, kind="qwen2", tied=False, dtype=torch.float32, shard=None, **overrides):
    """base, chat (base + noise), target (base + other noise) written under tmp. Returns paths + models."""
    base = hf_model(kind, seed=0, tie_word_embeddings=tied, **overrides)
    chat, target = perturbed(base, 1), perturbed(base, 2, amount=0.02)
    paths = {
        "base": write_model(base, tmp / "base", dtype),
        "chat": write_model(chat, tmp / "chat", dtype, chat_files=True),
        "target": write_model(target, tmp / "target", dtype, shard=shard),
    }
    return paths, {"base": base, "chat": chat, "target": target}


def load_sd(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, with plain safetensors."""
    sd = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        sd.update(load_file(f))
    return sd


def file_hashes(path: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(Path(path).iterdir()) if f.is_file()}


GROUP_OF = {"q_proj": "attention", "k_proj": "attention", "v_proj": "attention", "o_proj": "attention",
            "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def group_of(key: str) -> str:
    """Independent (hand-written) grouping of the tiny checkpoints' tensor names."""
    if key in (EMBED, HEAD):
        return "embeddings"
    if key.endswith(("layernorm.weight", "norm.weight")):
        return "norms"
    return GROUP_OF[key.split(".")[-2]]


# ---------------------------------------------------------------------- instruction residual
@pytest.mark.parametrize("tied", [False, True])
def test_residual_onto_base_reproduces_chat_exactly_fp32(tmp_path, tied):
    paths, _ = family(tmp_path, tied=tied)
    out = instruction_residual(paths["base"], paths["chat"], paths["base"], tmp_path / "out", special_rows="never")
    got, chat = load_sd(out), load_sd(paths["chat"])
    assert set(got) == set(chat) and (HEAD in got) == (not tied)
    for k in chat:
        assert got[k].dtype == torch.float32
        assert torch.equal(got[k], chat[k]), k
    assert any(k.endswith("q_proj.bias") for k in got)


def test_residual_bf16_onto_base_is_chat_bit_for_bit(tmp_path):
    paths, _ = family(tmp_path, dtype=torch.bfloat16)
    out = instruction_residual(paths["base"], paths["chat"], paths["base"], tmp_path / "out", special_rows="never")
    got, chat = load_sd(out), load_sd(paths["chat"])
    for k in chat:
        assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], chat[k]), k


@pytest.mark.parametrize("kind,tied", [("qwen2", False), ("qwen2", True), ("qwen3", False)])
def test_residual_with_scales_matches_closed_form(tmp_path, kind, tied):
    paths, _ = family(tmp_path, kind=kind, tied=tied)
    scales = {"attention": 0.5, "mlp": 2.0, "norms": 0.0, "embeddings": -1.0}
    out = instruction_residual(paths["base"], paths["chat"], paths["target"], tmp_path / "out",
                               scale=0.7, scales=scales, special_rows="never")
    got = load_sd(out)
    b, c, t = load_sd(paths["base"]), load_sd(paths["chat"]), load_sd(paths["target"])
    assert set(got) == set(t)
    for k in t:
        s = 0.7 * scales[group_of(k)]
        ref = (t[k].double() + s * (c[k].double() - b[k].double())).float()
        torch.testing.assert_close(got[k], ref, rtol=1e-6, atol=1e-7, msg=k)
        if group_of(k) == "norms":
            assert torch.equal(got[k], t[k])  # scale 0: copied as is
    if kind == "qwen3":
        assert any("q_norm" in k for k in got)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["effective_scales"] == {g: 0.7 * v for g, v in scales.items()}
    skipped = {r["tensor"] for r in manifest["skipped"]}
    assert skipped == {k for k in t if group_of(k) == "norms"}


def test_residual_output_loads_in_transformers_with_closed_form_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    paths, models = family(tmp_path, tied=True)
    out = instruction_residual(paths["base"], paths["chat"], paths["target"], tmp_path / "out", scale=0.5)
    ref = copy.deepcopy(models["target"])
    b, c, t = load_sd(paths["base"]), load_sd(paths["chat"]), load_sd(paths["target"])
    ref.load_state_dict({k: t[k] + 0.5 * (c[k] - b[k]) for k in t}, strict=False)
    ref.tie_weights()
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = random_ids(2, 11)
    with torch.no_grad():
        # observed 1.9e-7 (53x margin)
        assert max_rel_err(hf(ids).logits, ref(ids).logits) <= 1e-5


def test_sharded_target_layout_is_kept(tmp_path):
    paths, _ = family(tmp_path, shard="60KB")
    out = instruction_residual(paths["base"], paths["chat"], paths["target"], tmp_path / "out")
    src = json.loads((paths["target"] / "model.safetensors.index.json").read_text())
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    assert idx["weight_map"] == src["weight_map"] and len(set(idx["weight_map"].values())) > 2
    sizes = sum(v.numel() * v.element_size() for v in load_sd(out).values())
    assert idx["metadata"]["total_size"] == sizes
    for name in set(src["weight_map"].values()):  # each output shard holds exactly its target shard's tensors
        assert set(load_file(out / name)) == set(load_file(paths["target"] / name))


def test_tied_target_with_stored_head_copy(tmp_path):
    paths, _ = family(tmp_path, tied=True)
    f = paths["target"] / "model.safetensors"
    sd = load_file(f)
    sd[HEAD] = sd[EMBED].clone()  # a redundant copy, as some exports store it
    save_file(sd, f, metadata={"format": "pt"})
    out = instruction_residual(paths["base"], paths["chat"], paths["target"], tmp_path / "out", scale=2.0)
    got, b, c = load_sd(out), load_sd(paths["base"]), load_sd(paths["chat"])
    ref = (sd[EMBED].double() + 2.0 * (c[EMBED].double() - b[EMBED].double())).float()
    torch.testing.assert_close(got[EMBED], ref, rtol=1e-6, atol=1e-7)
    assert torch.equal(got[HEAD], got[EMBED])


def test_output_carries_chat_tokenizer_eos_and_manifest(tmp_path):
    paths, _ = family(tmp_path)
    before = {r: file_hashes(p) for r, p in paths.items()}
    out = instruction_residual(paths["base"], paths["chat"], paths["target"], tmp_path / "out", scale=0.3)
    assert {r: file_hashes(p) for r, p in paths.items()} == before  # inputs untouched
    cfg = json.loads((out / "config.json").read_text())
    gen = json.loads((out / "generation_config.json").read_text())
    tok = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["eos_token_id"] == 151645
    assert gen["eos_token_id"][0] == 151645 and 151643 in gen["eos_token_id"] and gen["temperature"] == 0.7
    assert tok["eos_token"] == "<|im_end|>" and tok["chat_template"] == CHAT_TEMPLATE
    assert (out / "vocab.json").exists() and (out / "merges.txt").exists()
    m = json.loads((out / "manifest.json").read_text())
    assert m["kind"] == "instruction_residual" and m["scale"] == 0.3
    for role in ("base", "chat", "target"):
        assert m["inputs"][role]["path"] == str(paths[role].resolve())
        assert m["inputs"][role]["sha256"] == {"model.safetensors": before[role]["model.safetensors"]}
    assert m["outputs"]["sha256"]["model.safetensors"] == hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    assert not list(tmp_path.glob(".*"))  # the staging dir was renamed into place, nothing left over


def test_skip_embeddings_and_patterns_copy_the_target(tmp_path):
    paths, _ = family(tmp_path)
    out = instruction_residual(paths["base"], paths["chat"], paths["target"], tmp_path / "out",
                               skip_embeddings=True, skip=["*.mlp.down_proj.weight"], special_rows="never")
    got, b, c, t = load_sd(out), load_sd(paths["base"]), load_sd(paths["chat"]), load_sd(paths["target"])
    for k in t:
        if k in (EMBED, HEAD) or k.endswith("down_proj.weight"):
            assert torch.equal(got[k], t[k]), k
        else:
            torch.testing.assert_close(got[k], (t[k].double() + c[k].double() - b[k].double()).float(),
                                       rtol=1e-6, atol=1e-7)
    m = json.loads((out / "manifest.json").read_text())
    reasons = {r["tensor"]: r["reason"] for r in m["skipped"]}
    assert reasons[EMBED] == reasons[HEAD] == "embeddings skipped"
    assert reasons["model.layers.1.mlp.down_proj.weight"] == "matched skip pattern"


# ---------------------------------------------------------------------- special-token rows
def _zero_rows(path: Path, rows, keys=(EMBED, HEAD)):
    f = path / "model.safetensors"
    sd = load_file(f)
    for k in keys:
        if k in sd:
            sd[k][list(rows)] = 0.0
    save_file(sd, f, metadata={"format": "pt"})


@pytest.mark.parametrize("tied", [False, True])
def test_special_rows_untrained_in_base_come_from_chat(tmp_path, tied):
    paths, _ = family(tmp_path, tied=tied)
    ids = (300, 301)
    _zero_rows(paths["base"], ids)   # a base model never saw the ChatML tokens ...
    _zero_rows(paths["target"], ids)  # ... nor did continued pretraining on plain text
    b, c, t = load_sd(paths["base"]), load_sd(paths["chat"]), load_sd(paths["target"])
    out = instruction_residual(paths["base"], paths["chat"], paths["target"], tmp_path / "auto",
                               scale=0.5, special_token_ids=ids)
    never = instruction_residual(paths["base"], paths["chat"], paths["target"], tmp_path / "never",
                                 scale=0.5, special_token_ids=ids, special_rows="never")
    got, plain = load_sd(out), load_sd(never)
    for k in [EMBED] + ([] if tied else [HEAD]):
        ref = (t[k].double() + 0.5 * (c[k].double() - b[k].double())).float()
        rest = [i for i in range(ref.shape[0]) if i not in ids]
        assert torch.equal(got[k][list(ids)], c[k][list(ids)])  # carried over exactly
        torch.testing.assert_close(got[k][rest], ref[rest], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(plain[k], ref, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(plain[k][list(ids)], c[k][list(ids)])  # the formula alone would not give them
    rows = json.loads((out / "manifest.json").read_text())["special_rows"]["rows"]
    assert all(r["carried"] and r["reason"] == "row untrained in base" for r in rows)
    assert len(rows) == (2 if tied else 4)


def test_special_rows_trained_everywhere_follow_the_formula_in_auto(tmp_path):
    paths, _ = family(tmp_path)
    out = instruction_residual(paths["base"], paths["chat"], paths["target"], tmp_path / "out",
                               special_token_ids=(300, 301))
    got, b, c, t = load_sd(out), load_sd(paths["base"]), load_sd(paths["chat"]), load_sd(paths["target"])
    torch.testing.assert_close(got[EMBED], (t[EMBED].double() + c[EMBED].double() - b[EMBED].double()).float(),
                               rtol=1e-6, atol=1e-7)
    always = instruction_residual(paths["base"], paths["chat"], paths["target"], tmp_path / "always",
                                  special_token_ids=(300, 301), special_rows="always")
    assert torch.equal(load_sd(always)[EMBED][[300, 301]], c[EMBED][[300, 301]])


def test_special_rows_always_outside_vocab_is_an_error(tmp_path):
    paths, _ = family(tmp_path)
    with pytest.raises(DeltaError, match="151644 is outside the 320 rows"):
        instruction_residual(paths["base"], paths["chat"], paths["target"], tmp_path / "o", special_rows="always")


# ---------------------------------------------------------------------- diff / apply / task arithmetic
def test_diff_then_apply(tmp_path):
    paths, _ = family(tmp_path, tied=True)
    d = diff(paths["chat"], paths["base"], tmp_path / "delta")
    b, c, t = load_sd(paths["base"]), load_sd(paths["chat"]), load_sd(paths["target"])
    got = load_sd(d)
    assert set(got) == set(c)
    for k in c:
        assert got[k].dtype == torch.float32
        assert torch.equal(got[k], (c[k].double() - b[k].double()).float()), k
    out = apply(paths["target"], d, tmp_path / "out", scale=-0.25)
    res = load_sd(out)
    for k in t:
        torch.testing.assert_close(res[k], (t[k].double() - 0.25 * got[k].double()).float(), rtol=1e-6, atol=1e-7)
    m = json.loads((d / "manifest.json").read_text())
    assert m["output"] == "delta" and m["inputs"]["a"]["path"] == str(paths["chat"].resolve())


def test_bf16_diff_apply_round_trip_is_exact(tmp_path):
    paths, _ = family(tmp_path, dtype=torch.bfloat16)
    d = diff(paths["chat"], paths["base"], tmp_path / "delta")  # float32: exact for bf16 inputs
    out = apply(paths["base"], d, tmp_path / "out")
    got, c = load_sd(out), load_sd(paths["chat"])
    for k in c:
        assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], c[k]), k


def test_task_arithmetic_weighted_sum_without_normalisation(tmp_path):
    paths, models = family(tmp_path)
    other = write_model(perturbed(models["base"], 7), tmp_path / "other")
    d1 = diff(paths["chat"], paths["base"], tmp_path / "d1")
    d2 = diff(other, paths["base"], tmp_path / "d2")
    out = task_arithmetic([d1, d2], [1.0, -0.5], tmp_path / "model", base=paths["base"])
    only = task_arithmetic([d1, d2], [0.75, 0.75], tmp_path / "sum")
    b, e1, e2 = load_sd(paths["base"]), load_sd(d1), load_sd(d2)
    got, s = load_sd(out), load_sd(only)
    for k in b:
        ref = b[k].double() + e1[k].double() - 0.5 * e2[k].double()
        torch.testing.assert_close(got[k], ref.float(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(s[k], (0.75 * e1[k].double() + 0.75 * e2[k].double()).float(), rtol=1e-6, atol=1e-7)
    assert json.loads((only / "manifest.json").read_text())["output"] == "delta"
    assert json.loads((out / "manifest.json").read_text())["weights"] == [1.0, -0.5]
    with pytest.raises(DeltaError, match="2 deltas but 1 weights"):
        task_arithmetic([d1, d2], [1.0], tmp_path / "x")
    with pytest.raises(DeltaError, match="weight 1 is nan"):
        task_arithmetic([d1, d2], [1.0, float("nan")], tmp_path / "x")
    with pytest.raises(DeltaError, match="not a delta checkpoint"):
        task_arithmetic([d1, paths["chat"]], [1.0, 1.0], tmp_path / "x")


# ---------------------------------------------------------------------- checks
def test_mismatches_are_errors_naming_the_tensor_or_field(tmp_path):
    paths, _ = family(tmp_path)
    wide = write_model(hf_model("qwen2", vocab_size=336), tmp_path / "wide")
    with pytest.raises(DeltaError, match=r"tensor '(model.embed_tokens|lm_head).weight': vocabulary rows differ: shape \(336, 48\) in target"):
        instruction_residual(paths["base"], paths["chat"], wide, tmp_path / "o")
    other = write_model(hf_model("qwen2", intermediate_size=96), tmp_path / "other")
    with pytest.raises(DeltaError, match="field 'intermediate_size' differs: 96 in target .* but 88 in base"):
        instruction_residual(paths["base"], paths["chat"], other, tmp_path / "o")
    tied = write_model(hf_model("qwen2", tie_word_embeddings=True), tmp_path / "tied")
    with pytest.raises(DeltaError, match="tie_word_embeddings"):
        diff(paths["chat"], tied, tmp_path / "o")
    half = write_model(hf_model("qwen2"), tmp_path / "half", dtype=torch.bfloat16)
    with pytest.raises(DeltaError, match=r"tensor '.*': dtype torch.float32 in target .* but torch.bfloat16 in base"):
        instruction_residual(half, paths["chat"], paths["target"], tmp_path / "o")
    sd = load_file(paths["chat"] / "model.safetensors")
    del sd["model.layers.1.self_attn.k_proj.bias"]
    save_file(sd, paths["chat"] / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(DeltaError, match="'model.layers.1.self_attn.k_proj.bias' is in target .* but missing from chat"):
        instruction_residual(paths["base"], paths["chat"], paths["target"], tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_output_paths_are_checked(tmp_path):
    paths, _ = family(tmp_path)
    with pytest.raises(DeltaError, match="overlaps input target"):
        instruction_residual(paths["base"], paths["chat"], paths["target"], paths["target"])
    with pytest.raises(DeltaError, match="overlaps input"):
        diff(paths["chat"], paths["base"], paths["base"] / "sub")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("x")
    with pytest.raises(DeltaError, match="already exists"):
        diff(paths["chat"], paths["base"], tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "x"
    with pytest.raises(DeltaError, match="holds 'keep.txt' and no manifest.json of lora.delta.*nothing was deleted"):
        diff(paths["chat"], paths["base"], tmp_path / "taken", overwrite=True)   # a user's folder: never replaced
    assert (tmp_path / "taken" / "keep.txt").read_text() == "x"
    diff(paths["chat"], paths["base"], tmp_path / "ours")
    diff(paths["chat"], paths["base"], tmp_path / "ours", overwrite=True)        # our own output: replaced
    assert json.loads((tmp_path / "ours" / "manifest.json").read_text())["tool"] == "lora.delta"
    with pytest.raises(DeltaError, match="not a delta checkpoint"):
        apply(paths["target"], paths["chat"], tmp_path / "o")
    with pytest.raises(DeltaError, match="not a directory"):
        diff(tmp_path / "nope", paths["base"], tmp_path / "o")
    cfg = json.loads((paths["chat"] / "config.json").read_text())
    (tmp_path / "q").mkdir()
    save_file(load_file(paths["chat"] / "model.safetensors"), tmp_path / "q" / "model.safetensors")
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (tmp_path / "q" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DeltaError, match="quantization_config is set"):
        diff(tmp_path / "q", paths["base"], tmp_path / "o")
    with pytest.raises(DeltaError, match="unknown group 'head'"):
        instruction_residual(paths["base"], paths["chat"], paths["target"], tmp_path / "o", scales={"head": 1.0})
