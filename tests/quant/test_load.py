"""Streaming 4-bit load and the on-disk format, against transformers + bitsandbytes on CPU (and the
load on a CUDA device, where there is one)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import quant
from models.qwen import load, save
from quant import NF4Linear, NF4Quantizer
from tests.helpers import DEVICES, assert_close_to_reference, assert_logits_match, float64_twin, max_rel_err, random_ids

bnbf = pytest.importorskip("bitsandbytes.functional")
transformers = pytest.importorskip("transformers")

DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _hf_4bit(path, device="cpu"):
    cfg = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    return _exact_bnb_kernels(transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=cfg, dtype=torch.float32, device_map=device
    ).eval())


def _exact_bnb_kernels(model):
    """`model` with every Linear4bit kept on bitsandbytes' exact dequantise + matmul path."""
    # On CPUs with AVX512-BF16, bitsandbytes (0.50 here) repacks a Linear4bit in eval mode into
    # a bf16 inference kernel (`packing_format_for_cpu`) whose output is ~1e-3 off its own
    # dequantise + matmul. The reference here is bitsandbytes' exact path (the one it trains
    # with), so keep every module on it, whatever the processor.
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


@pytest.fixture(scope="module")
def hf4(ckpts):
    return _hf_4bit(ckpts["aligned"][0])


@pytest.mark.parametrize("device", DEVICES)
def test_streaming_load_equals_transformers_bnb_logits(ckpts, request, device):
    path, hf16 = ckpts["aligned"]
    # On CUDA both sides quantise there (bitsandbytes with its CUDA kernels) and run there.
    hf4 = request.getfixturevalue("hf4") if device == "cpu" else _hf_4bit(path, device)
    hf16 = hf16 if device == "cpu" else copy.deepcopy(hf16).to(device)  # the fixture stays on the CPU
    ours = load(path, dtype=torch.float32, device=device, quantize=NF4Quantizer())
    n_nf4 = sum(isinstance(m, NF4Linear) for m in ours.modules())
    assert n_nf4 == 7 * hf16.config.num_hidden_layers  # every decoder linear, not lm_head/embeddings
    assert not isinstance(ours.lm_head, NF4Linear)
    assert ours.model.layers[0].mlp.up_proj.weight.device.type == device
    ids = random_ids(2, 12).to(device)
    with torch.no_grad():
        logits = ours(ids)
        ref = hf4(ids).logits
        full = hf16(ids).logits
        assert_logits_match(logits, hf4, ids)
    # and within the NF4 error of the 16-bit model (the same as bitsandbytes' own error): the
    # two NF4 errors (~1e-2) differ by no more than ours and bitsandbytes' logits do (above: at
    # most 8 floors, ~2e-6; measured 0), so 1e-4 is 50x that and ~1% of the NF4 error itself
    err = max_rel_err(logits, full)
    assert 1e-3 < err < 0.25
    assert abs(err - max_rel_err(ref, full)) < 1e-4
    # packed bytes of every layer equal transformers' Params4bit
    for i, layer in enumerate(hf4.model.layers):
        for name in ("q_proj", "down_proj"):
            a = getattr(layer.self_attn if name == "q_proj" else layer.mlp, name).weight.data
            b = getattr(ours.model.layers[i].self_attn if name == "q_proj" else ours.model.layers[i].mlp, name).weight
            assert torch.equal(a, b)


def test_odd_shapes_equal_dequantised_weight_reference(ckpts):
    """hidden 48 / MLP 88 (rows straddle blocks). bitsandbytes' AVX-512 CPU kernel is wrong for
    such rows (see test_codec), so the reference is the 16-bit model whose decoder weights are
    replaced by bitsandbytes' quantise -> generic-kernel dequantise."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    path, _ = ckpts["odd"]
    ours = load(path, dtype=torch.float32, quantize=NF4Quantizer())
    ref = load(path, dtype=torch.float32)
    with torch.no_grad():
        for name, module in ref.named_modules():
            if name.rpartition(".")[2] in DECODER_LINEARS:
                w = module.weight
                packed, st = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True, blocksize=64)
                absmax = bnbf.dequantize_blockwise(st.absmax, st.state2) + st.offset
                fn = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
                w.copy_(fn(packed.reshape(-1), absmax, st.code, 64, tuple(w.shape), torch.float32))
        ids = random_ids(2, 10)
        assert_close_to_reference(ours(ids), ref(ids), float64_twin(ref)(ids))


def test_bf16_load_is_bf16(ckpts):
    ours = load(ckpts["aligned"][0], dtype=torch.bfloat16, quantize=NF4Quantizer())
    layer = ours.model.layers[0].mlp.up_proj
    assert layer.compute_dtype == torch.bfloat16 and layer.quant.dtype == torch.bfloat16
    with torch.no_grad():
        assert ours(random_ids(1, 6)).dtype == torch.bfloat16


def test_quantize_model_equals_streaming(ckpts):
    path, _ = ckpts["aligned"]
    streamed = load(path, dtype=torch.float32, quantize=NF4Quantizer())
    whole = quant.quantize_model(load(path, dtype=torch.float32))
    sa, sb = streamed.state_dict(), whole.state_dict()
    assert set(sa) == set(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_our_4bit_checkpoint_loads_in_transformers_and_back(ckpts, hf4, tmp_path):
    path, _ = ckpts["aligned"]
    ours = load(path, dtype=torch.float32, quantize=NF4Quantizer())
    save(ours, tmp_path / "ours4")
    cfg = json.loads((tmp_path / "ours4" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "bitsandbytes" and cfg["quantization_config"]["load_in_4bit"]
    theirs = _exact_bnb_kernels(
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours4", dtype=torch.float32, device_map="cpu"))
    assert type(theirs.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    ids = random_ids(2, 9)
    with torch.no_grad():
        ref = hf4(ids).logits
        assert torch.equal(theirs(ids).logits, ref)
        again = load(tmp_path / "ours4", dtype=torch.float32, quantize=quant.quantizer_for(tmp_path / "ours4", False))
        assert isinstance(again.model.layers[1].mlp.down_proj, NF4Linear)
        assert torch.allclose(again(ids), ref, rtol=0, atol=1e-5 * ref.abs().max().item())


def test_the_quantizer_is_passed_not_named(ckpts, tmp_path):
    """load() takes the quantizer object (models.qwen imports no quantization package); a
    checkpoint saved in 4-bit without one, or a quantizer's name, is a one-line error."""
    from models.qwen import CheckpointError

    path, _ = ckpts["aligned"]
    with pytest.raises(TypeError, match=r"quantize='nf4': pass the quantizer itself, e\.g\. quantize=quant\.NF4Quantizer\(\)"):
        load(path, dtype=torch.float32, quantize="nf4")
    save(load(path, dtype=torch.float32, quantize=NF4Quantizer()), tmp_path / "q")
    assert quant.saved_in_4bit(tmp_path / "q") and not quant.saved_in_4bit(path)
    assert quant.quantizer_for(path, qlora=False) is None
    with pytest.raises(CheckpointError, match=r"config\.json: the weights are saved in bitsandbytes 4-bit .*quantize=quant\.NF4Quantizer\(\)"):
        load(tmp_path / "q", dtype=torch.float32)


def test_transformers_4bit_checkpoint_loads_in_ours(ckpts, hf4, tmp_path):
    hf4.save_pretrained(tmp_path / "hf4")
    ours = load(tmp_path / "hf4", dtype=torch.float32, quantize=NF4Quantizer())
    assert isinstance(ours.model.layers[0].self_attn.k_proj, NF4Linear)
    ids = random_ids(1, 11)
    with torch.no_grad():
        assert_logits_match(ours(ids), hf4, ids)


def test_corrupt_quant_state_is_an_error_naming_the_tensor(ckpts, tmp_path):
    path, _ = ckpts["aligned"]
    save(load(path, dtype=torch.float32, quantize=NF4Quantizer()), tmp_path / "q")
    f = tmp_path / "q" / "model.safetensors"
    tensors = load_file(f)
    key = "model.layers.1.mlp.up_proj.weight.quant_state.bitsandbytes__nf4"
    meta = json.loads(bytes(tensors[key].tolist()))
    meta["blocksize"] = 48
    tensors[key] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight: corrupt 4-bit quant_state: blocksize"):
        load(tmp_path / "q", dtype=torch.float32, quantize=NF4Quantizer())
    del tensors["model.layers.0.self_attn.q_proj.weight.absmax"]
    tensors[key] = quant.serialization.pack_json(dict(meta, blocksize=64))
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj"):
        load(tmp_path / "q", dtype=torch.float32, quantize=NF4Quantizer())


def test_memory_report(ckpts):
    ours = load(ckpts["aligned"][0], dtype=torch.float32, quantize=NF4Quantizer())
    rep = quant.memory_report(ours)
    expected = 0
    for m in ours.modules():
        if isinstance(m, NF4Linear):
            n = m.in_features * m.out_features
            blocks = -(-n // 64)
            expected += -(-n // 2) + blocks + 16 * 4 + 4 * -(-blocks // 256) + 256 * 4
            expected += 0 if m.bias is None else 4 * m.out_features
    assert rep.components["nf4 weights (+stats, bias)"] == expected
    dense = sum(p.numel() * 4 for n, p in ours.named_parameters() if p.dtype == torch.float32 and not any(
        n.endswith(s + ".bias") for s in DECODER_LINEARS))
    assert rep.components["unquantised params"] == dense
    assert rep.measured_peak > 0 and "predicted total" in rep.format()


def test_import_without_bitsandbytes(tmp_path):
    code = (
        "import sys; sys.modules['bitsandbytes'] = None; sys.modules['bitsandbytes.functional'] = None\n"
        "import torch, quant\n"
        "assert not quant.backend.available()\n"
        "q = quant.quantize(torch.randn(64, 64)); print(q.dequantize().shape)\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
