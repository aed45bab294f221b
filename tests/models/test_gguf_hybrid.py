"""GGUF export of the hybrid families (Gated DeltaNet + gated attention): Qwen3.5 -> `qwen35`,
Qwen3.5-MoE -> `qwen35moe`, Qwen3-Next -> `qwen3next`, read back with gguf's GGUFReader.

The reference is llama.cpp's convert_hf_to_gguf.py (conversion/qwen.py: Qwen3NextModel,
_LinearAttentionVReorderBase, _Qwen35MRopeMixin, Qwen3_5TextModel, Qwen3_5MoeTextModel,
Qwen2MoeModel; conversion/base.py: TextModel.set_gguf_parameters, ModelBase.prepare_tensors).
The expected tensors are computed here from the safetensors transformers wrote, by this file's
own transcription of those methods (index permutations and slices, written independently of
models/qwen/export); names come from the gguf package's tables (get_tensor_name_map,
MODEL_TENSORS, TENSOR_NAMES, Keys), hyper-parameters from transformers' config.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.models.test_gguf import byte_tokenizer, q8_0_bound, read

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import Keys  # noqa: E402
from gguf import MODEL_TENSOR as T  # noqa: E402

from models.qwen.export import ExportError, export_gguf  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*falling back to its reference PyTorch implementation")

# Four layers, the fourth full attention: llama.cpp builds its layer stack from
# full_attention_interval (default 4), so layer_types must follow it. Two key heads, four value
# heads: the Qwen3.5 value-head reordering moves rows.
LAYERS = dict(num_hidden_layers=4, layer_types=["linear_attention"] * 3 + ["full_attention"])
FAMILIES = {"qwen3_5": gguf.MODEL_ARCH.QWEN35, "qwen3_5_moe": gguf.MODEL_ARCH.QWEN35MOE,
            "qwen3_next": gguf.MODEL_ARCH.QWEN3NEXT}


def hf_hybrid(family: str, seed: int = 0):
    """A tiny transformers model of the family (fp32, small parameters randomised)."""
    if family == "qwen3_5":
        from tests.models.test_qwen35 import hf_qwen35
        return hf_qwen35(seed=seed, **LAYERS)
    if family == "qwen3_5_moe":
        from tests.models.test_qwen35_moe import hf_qwen35_moe
        return hf_qwen35_moe(seed=seed, **LAYERS)
    from tests.models.test_qwen3_next import hf_qwen3_next
    return hf_qwen3_next(seed=seed, mlp_only_layers=[], **LAYERS)


def write_hybrid(path, family: str, dtype=torch.float32):
    model = hf_hybrid(family).to(dtype)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path, model.config


# ---------------------------------------------------------------------- the converter, transcribed
def tiled(n_k: int, r: int, d: int) -> torch.Tensor:
    """_LinearAttentionVReorderBase._reorder_v_heads as a gather: new position (v, k, i) takes
    old (k, v, i) of a [n_k groups x r value heads x d] axis."""
    return torch.tensor([(k * r + v) * d + i for v in range(r) for k in range(n_k) for i in range(d)])


def qkvz_rows(n_k: int, dk: int, r: int, dv: int) -> tuple[list[int], list[int]]:
    """Rows of in_proj_qkvz ([q, k, v, z] per key head) that make attn_qkv (all q, all k, all v)
    and attn_gate (all z): Qwen3NextModel.modify_tensors."""
    size = 2 * dk + 2 * r * dv
    part = lambda lo, n: [g * size + lo + i for g in range(n_k) for i in range(n)]  # noqa: E731
    return part(0, dk) + part(dk, dk) + part(2 * dk, r * dv), part(2 * dk + r * dv, r * dv)


def expected_tensors(source: dict, c, family: str) -> dict[str, torch.Tensor]:
    """{GGUF name: tensor} the converter writes for these safetensors (float32 arithmetic)."""
    arch = FAMILIES[family]
    names = gguf.get_tensor_name_map(arch, c.num_hidden_layers)
    n_k, n_v, dk, dv = c.linear_num_key_heads, c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim
    r = n_v // n_k
    reorder = family != "qwen3_next" and n_k != n_v   # Qwen3.5 classes derive from the V-reorder base
    qk = 2 * n_k * dk
    v_rows, heads = tiled(n_k, r, dv), tiled(n_k, r, 1)
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for name, x in source.items():
        x = x.float()
        parts = name.split(".")
        if ".mlp.experts." in name:   # Qwen2MoeModel: stacked in expert order
            experts.setdefault((int(parts[2]), parts[6]), {})[int(parts[5])] = x
            continue
        if reorder and "linear_attn." in name:
            if "in_proj_qkv." in name:
                x = torch.cat([x[:qk], x[qk:][v_rows]])
            elif "in_proj_z." in name:
                x = x[v_rows]
            elif "in_proj_a." in name or "in_proj_b." in name or name.endswith(("A_log", "dt_bias")):
                x = x[heads]
            elif "conv1d" in name:
                x = torch.cat([x[:qk], x[qk:][v_rows]])
            elif "out_proj." in name:
                x = x[:, v_rows]
        if name.endswith("A_log"):
            x = -torch.exp(x)
        elif name.endswith("dt_bias"):
            name = name.replace("dt_bias", "dt_proj.bias")
        elif "conv1d" in name:
            x = x.reshape(x.shape[0], x.shape[-1])   # [channels, 1, kernel] -> [channels, kernel]
        elif name.endswith("norm.weight") and "linear_attn.norm" not in name:
            x = x + 1   # zero-centred RMSNorm: llama.cpp multiplies by the weight itself
        if "in_proj_qkvz" in name:
            rows_qkv, rows_z = qkvz_rows(n_k, dk, r, dv)
            out[gguf.TENSOR_NAMES[T.ATTN_QKV].format(bid=parts[2]) + ".weight"] = x[rows_qkv]
            out[gguf.TENSOR_NAMES[T.ATTN_GATE].format(bid=parts[2]) + ".weight"] = x[rows_z]
            continue
        out[names.get_name(name, try_suffixes=(".weight", ".bias"))] = x
    kinds = {"gate_proj": T.FFN_GATE_EXP, "up_proj": T.FFN_UP_EXP, "down_proj": T.FFN_DOWN_EXP}
    for (layer, w), by_expert in experts.items():
        stacked = torch.stack([by_expert[e] for e in range(len(by_expert))])
        out[gguf.TENSOR_NAMES[kinds[w]].format(bid=layer) + ".weight"] = stacked
    return out


F32_KINDS = (T.FFN_GATE_INP, T.FFN_GATE_INP_SHEXP, T.SSM_CONV1D)   # ModelBase.prepare_tensors' list


def expected_type(name: str, x: torch.Tensor, file_type: str, layers: int) -> Q:
    """ModelBase.prepare_tensors: 1-D, norms, non-`.weight` and the listed kinds F32; else the file
    type, Q8_0 falling back to F16 for rows that are not whole 32-blocks."""
    always = {gguf.TENSOR_NAMES[k].format(bid=i) + ".weight" for k in F32_KINDS for i in range(layers)}
    if x.dim() <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight") or name in always:
        return Q.F32
    if file_type == "q8_0":
        return Q.Q8_0 if x.shape[-1] % 32 == 0 else Q.F16
    return Q.F16


def assert_tensor(t, x: torch.Tensor, wanted: Q, name: str) -> None:
    assert [int(n) for n in reversed(t.shape)] == list(x.shape), name   # GGUF stores ggml order
    assert t.tensor_type == wanted, (name, t.tensor_type)
    data = np.asarray(t.data)
    if wanted == Q.F32:
        assert np.array_equal(data.reshape(x.shape), x.numpy()), name
    elif wanted == Q.F16:
        assert np.array_equal(data.reshape(x.shape), x.to(torch.float16).numpy()), name
    else:
        deq = torch.from_numpy(gguf.quants.dequantize(data, Q.Q8_0).copy()).reshape(x.shape)
        assert bool(((deq.double() - x.double()).abs() <= q8_0_bound(x)).all()), name


def expected_metadata(c, family: str, file_type: str, raw: dict) -> dict:
    """TextModel / Qwen2MoeModel / Qwen3NextModel / _Qwen35MRopeMixin .set_gguf_parameters."""
    arch = gguf.MODEL_ARCH_NAMES[FAMILIES[family]]
    k = {
        Keys.General.ARCHITECTURE: arch,
        Keys.LLM.BLOCK_COUNT: c.num_hidden_layers,   # no MTP block (none in the checkpoint, --no-mtp)
        Keys.LLM.CONTEXT_LENGTH: c.max_position_embeddings,
        Keys.LLM.EMBEDDING_LENGTH: c.hidden_size,
        Keys.Attention.HEAD_COUNT: c.num_attention_heads,
        Keys.Attention.HEAD_COUNT_KV: c.num_key_value_heads,
        Keys.Attention.KEY_LENGTH: c.head_dim,
        Keys.Attention.VALUE_LENGTH: c.head_dim,
        Keys.SSM.CONV_KERNEL: c.linear_conv_kernel_dim,
        Keys.SSM.STATE_SIZE: c.linear_key_head_dim,
        Keys.SSM.GROUP_COUNT: c.linear_num_key_heads,
        Keys.SSM.TIME_STEP_RANK: c.linear_num_value_heads,
        Keys.SSM.INNER_SIZE: c.linear_value_head_dim * c.linear_num_value_heads,
        Keys.LLM.FULL_ATTENTION_INTERVAL: raw.get("full_attention_interval", 4),
        Keys.Rope.DIMENSION_COUNT: int(c.head_dim * raw.get("partial_rotary_factor", 0.25)),
        Keys.General.FILE_TYPE: {"f16": 1, "q8_0": 7}[file_type],
    }
    if "intermediate_size" in raw:   # Qwen3.5-MoE's config.json has none
        k[Keys.LLM.FEED_FORWARD_LENGTH] = c.intermediate_size
    if family != "qwen3_next":   # no mrope_section in a text config: the mixin's default
        k[Keys.Rope.DIMENSION_SECTIONS] = [11, 11, 10, 0]
    if family != "qwen3_5":
        k.update({Keys.LLM.EXPERT_COUNT: c.num_experts, Keys.LLM.EXPERT_USED_COUNT: c.num_experts_per_tok,
                  Keys.LLM.EXPERT_FEED_FORWARD_LENGTH: c.moe_intermediate_size,
                  Keys.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH: c.shared_expert_intermediate_size})
    return {key.format(arch=arch): v for key, v in k.items()}


CASES = [(f, t) for f in FAMILIES for t in ("f16", "q8_0")]


@pytest.mark.parametrize("family,file_type", CASES, ids=[f"{f}-{t}" for f, t in CASES])
def test_hybrid_as_llama_cpp_converts_it(tmp_path, family, file_type):
    model_dir, c = write_hybrid(tmp_path / "model", family)
    raw = json.loads((model_dir / "config.json").read_text())
    assert "partial_rotary_factor" not in raw and c.rope_parameters["partial_rotary_factor"] == 0.25
    summary = export_gguf(model_dir, tmp_path / "m.gguf", file_type)
    fields, tensors = read(summary.path)
    source = load_file(str(model_dir / "model.safetensors"))
    expected = expected_tensors(source, c, family)

    arch = FAMILIES[family]
    allowed = {gguf.TENSOR_NAMES[k].format(bid=i) for k in gguf.MODEL_TENSORS[arch] for i in range(c.num_hidden_layers)}
    assert set(tensors) == set(expected)
    assert all(n.rsplit(".", 1)[0] in allowed or n in allowed for n in tensors)   # kinds the arch has
    for name, x in expected.items():
        assert_tensor(tensors[name], x, expected_type(name, x, file_type, c.num_hidden_layers), name)
    assert summary.architecture == fields[Keys.General.ARCHITECTURE] == gguf.MODEL_ARCH_NAMES[arch]
    for key, value in expected_metadata(c, family, file_type, raw).items():
        assert fields[key] == value, key
    assert fields[Keys.Rope.FREQ_BASE.format(arch=summary.architecture)] == c.rope_parameters["rope_theta"]
    assert fields[Keys.Attention.LAYERNORM_RMS_EPS.format(arch=summary.architecture)] == np.float32(c.rms_norm_eps)
    assert not any("nextn" in k for k in fields)


def test_bf16_checkpoint_goes_through_float32(tmp_path):
    """ModelBase.prepare_tensors turns bf16 into float32 before modify_tensors: the +1 of the norms
    and -exp(A_log) are float32 arithmetic on the bf16 values (bf16 arithmetic would round them)."""
    model_dir, c = write_hybrid(tmp_path / "model", "qwen3_5", torch.bfloat16)
    fields, tensors = read(export_gguf(model_dir, tmp_path / "m.gguf", "f16").path)
    source = load_file(str(model_dir / "model.safetensors"))
    for name, x in expected_tensors(source, c, "qwen3_5").items():
        assert_tensor(tensors[name], x, expected_type(name, x, "f16", c.num_hidden_layers), name)
    norm = source["model.norm.weight"]
    assert not torch.equal((norm + 1).float(), norm.float() + 1)   # the case bites on these weights


def test_fused_experts_give_the_same_file(tmp_path):
    """A Qwen3.5-MoE checkpoint with transformers' fused experts (mlp.experts.gate_up_proj /
    down_proj, the published layout): Qwen2MoeModel splits gate_up into gate and up rows, so the
    GGUF tensors are those of the per-expert checkpoint."""
    from safetensors.torch import save_file

    model_dir, c = write_hybrid(tmp_path / "model", "qwen3_5_moe")
    per_expert = export_gguf(model_dir, tmp_path / "a.gguf", "f16").path
    source = load_file(str(model_dir / "model.safetensors"))
    fused = {k: v for k, v in source.items() if ".mlp.experts." not in k}
    for i in range(c.num_hidden_layers):
        e = lambda w: torch.stack([source[f"model.layers.{i}.mlp.experts.{j}.{w}_proj.weight"]  # noqa: E731
                                   for j in range(c.num_experts)])
        fused[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.cat([e("gate"), e("up")], 1)
        fused[f"model.layers.{i}.mlp.experts.down_proj"] = e("down")
    save_file(fused, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    _, a = read(per_expert)
    _, b = read(export_gguf(model_dir, tmp_path / "b.gguf", "f16").path)
    assert set(a) == set(b)
    assert all(np.array_equal(np.asarray(a[n].data), np.asarray(b[n].data)) for n in a)

    down = "model.layers.1.mlp.experts.down_proj"
    fused[down] = fused[down][:, :, :-1].contiguous()
    save_file(fused, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ExportError, match=r"model\.safetensors: tensor 'model\.layers\.1\.mlp\.experts\.down_proj' "
                                          r"has shape \(6, 64, 63\), expected \(6, 64, 64\)"):
        export_gguf(model_dir, tmp_path / "c.gguf", "f16")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_script_on_each_family(tmp_path, family):
    """examples/export.py, as users run it, on each folder: exit 0, the file and its Modelfile."""
    from tests.examples.conftest import run_script

    model_dir, _ = write_hybrid(tmp_path / "model", family)
    out = tmp_path / "gguf" / "m-q8_0.gguf"
    proc = run_script("export.py", "--model", model_dir, "--gguf", out, "--type", "q8_0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    fields, _ = read(out)
    assert fields[Keys.General.ARCHITECTURE] == gguf.MODEL_ARCH_NAMES[FAMILIES[family]]
    assert (out.parent / "Modelfile").is_file()


def test_refuses_what_llama_cpp_would_get_wrong(tmp_path):
    """One line each, from config.json, before any tensor is read. (A whole vision-language folder
    is exported as its text model: tests/models/test_whole.py.)"""
    model_dir, _ = write_hybrid(tmp_path / "model", "qwen3_5")
    cfg_path = model_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cases = [
        (dict(cfg, layer_types=["linear_attention", "full_attention"] * 2), r"layer_types is not every 4th layer"),
        (dict(cfg, rope_parameters=dict(cfg["rope_parameters"], partial_rotary_factor=0.5)),
         r"partial_rotary_factor 0\.5 .*top-level key \(default 0\.25\)"),
    ]
    for bad, message in cases:
        cfg_path.write_text(json.dumps(bad))
        with pytest.raises(ExportError, match=r"config\.json: " + message) as info:
            export_gguf(model_dir, tmp_path / "x.gguf")
        assert "\n" not in str(info.value)
    assert not list(tmp_path.glob("*.gguf"))
