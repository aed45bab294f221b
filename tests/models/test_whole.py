"""A Qwen3.5 vision-language checkpoint comes out whole (models/qwen/whole.py), against
transformers' Qwen3_5ForConditionalGeneration / Qwen3_5MoeForConditionalGeneration on tiny random
checkpoints with a vision tower, an MTP head (synthetic `mtp.*` tensors in bf16, in a shard of
their own, as the published checkpoints store them: transformers' class has no MTP module and
ignores them on load) and processor files.

The helpers here (`vl_checkpoint`, `assert_whole`, `image_logits`, ...) are also used by the
script tests (tests/examples/test_qwen35_whole.py)."""

from __future__ import annotations

import json
import shutil
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models.qwen import load, save
from tests.helpers import max_rel_err, random_ids

pytestmark = pytest.mark.filterwarnings("ignore:.*falling back to its reference PyTorch implementation",
                                        "ignore:.*written without tokenizer files")

ROOT = Path(__file__).resolve().parents[2]
TEXT = "model.language_model."
# image tokens inside the tiny vocabularies (transformers' defaults, 248053..248056, are not)
IMAGE_TOKENS = dict(image_token_id=300, video_token_id=301, vision_start_token_id=302, vision_end_token_id=303)
PROCESSOR_FILES = {
    "preprocessor_config.json": {"image_processor_type": "Qwen2VLImageProcessorFast", "patch_size": 4,
                                 "temporal_patch_size": 1, "merge_size": 2},
    "video_preprocessor_config.json": {"video_processor_type": "Qwen3VLVideoProcessor", "patch_size": 4},
    "processor_config.json": {"processor_class": "Qwen3VLProcessor"},
    "chat_template.json": {"chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"},
}


def hf_vl(moe: bool, seed: int = 0, **overrides):
    """A tiny random transformers Qwen3_5[Moe]ForConditionalGeneration (fp32) with its image tokens in
    the vocabulary."""
    if moe:
        from tests.models.test_qwen35_moe import hf_qwen35_moe_multimodal as build
    else:
        from tests.models.test_qwen35 import hf_qwen35_multimodal as build
    model = build(seed=seed, **overrides)
    for key, value in IMAGE_TOKENS.items():
        setattr(model.config, key, value)
    return model


def mtp_tensors(hidden: int) -> dict[str, torch.Tensor]:
    """A multi-token-prediction head's tensors (a few of a real one's names), in bf16."""
    g = torch.Generator().manual_seed(11)
    shapes = {"mtp.fc.weight": (hidden, 2 * hidden), "mtp.pre_fc_norm_embedding.weight": (hidden,),
              "mtp.pre_fc_norm_hidden.weight": (hidden,), "mtp.norm.weight": (hidden,),
              "mtp.layers.0.self_attn.q_proj.weight": (2 * hidden, hidden),
              "mtp.layers.0.mlp.down_proj.weight": (hidden, 2 * hidden)}
    return {k: torch.randn(s, generator=g).bfloat16() for k, s in shapes.items()}


def vl_checkpoint(path: Path, moe: bool = False, seed: int = 0, shard: str = "150KB", extra_visual=None,
                  **overrides) -> Path:
    """Write a tiny vision-language checkpoint as published: several shards + index, an MTP head in a
    shard of its own (text_config mtp_num_hidden_layers 1), the processor files. extra_visual:
    {name: tensor} added to the vision tower's tensors (one shard each; the memory test's big tower)."""
    model = hf_vl(moe, seed=seed, **overrides)
    model.save_pretrained(path, max_shard_size=shard)
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    extra = {"model-mtp.safetensors": mtp_tensors(model.config.text_config.hidden_size)}
    for i, (name, tensor) in enumerate((extra_visual or {}).items()):
        extra[f"model-visual-{i}.safetensors"] = {name: tensor}
    for fname, tensors in extra.items():
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        index["weight_map"].update({k: fname for k in tensors})
    index_file.write_text(json.dumps(index))
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["mtp_num_hidden_layers"] = 1  # as the published configs say
    (path / "config.json").write_text(json.dumps(config, indent=2))
    for name, content in PROCESSOR_FILES.items():
        (path / name).write_text(json.dumps(content, indent=2) + "\n")
    return path


def tensors_of(folder: Path) -> dict[str, tuple[str, bytes]]:
    """Every tensor of a checkpoint folder: name -> (dtype, raw bytes)."""
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                out[k] = (str(t.dtype), t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return out


def is_text(name: str) -> bool:
    return name.startswith(TEXT) or name.startswith("lm_head.")


def assert_whole(out: Path, base: Path, moe: bool = False, changed_keys: tuple = ()):
    """`out` is the whole model `base` was: transformers' class loads it with no missing or unexpected
    weights, every tensor outside the language model has the same name, dtype and bytes, the
    config is base's but `changed_keys` of text_config, and the processor files are identical.
    Returns the transformers model."""
    from transformers import Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration

    cls = Qwen3_5MoeForConditionalGeneration if moe else Qwen3_5ForConditionalGeneration
    model, info = cls.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ours, theirs = tensors_of(out), tensors_of(base)
    outside = {k: v for k, v in theirs.items() if not is_text(k)}
    assert any(k.startswith("mtp.") for k in outside) and any(k.startswith("model.visual.") for k in outside)
    assert {k: v for k, v in ours.items() if not is_text(k)} == outside
    assert all(is_text(k) for k in ours if k not in outside)
    want = json.loads((base / "config.json").read_text())
    got = json.loads((out / "config.json").read_text())
    for key in changed_keys:
        want["text_config"].pop(key, None), got["text_config"].pop(key, None)
    assert got == want
    for name in PROCESSOR_FILES:
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    return model.eval()


def image_inputs(seed: int = 0):
    """A prompt holding one 16x16 image (4 patches of 4x4 per side, merged 2x2: 4 image tokens), as
    the processor would give it: input_ids, pixel_values [16, 3*1*4*4], image_grid_thw [[1, 4, 4]],
    mm_token_type_ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([random_ids(1, 5, vocab=300, seed=seed)[0], torch.tensor([302, 300, 300, 300, 300, 303]),
                     random_ids(1, 6, vocab=300, seed=seed + 1)[0]])[None]
    return dict(input_ids=ids, pixel_values=torch.randn(16, 48, generator=g), image_grid_thw=torch.tensor([[1, 4, 4]]),
                mm_token_type_ids=(ids == IMAGE_TOKENS["image_token_id"]).long())  # 1: an image token


@torch.no_grad()
def image_logits(model, seed: int = 0) -> torch.Tensor:
    return model(**image_inputs(seed)).logits


def with_text_of(base_model, out: Path):
    """transformers' model of the base checkpoint with only its language-model weights replaced by
    those `out` holds (read through transformers' own loader of `out`)."""
    from transformers import AutoModelForImageTextToText

    donor = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    state = {k: v for k, v in donor.state_dict().items() if k.startswith("model.language_model.") or k == "lm_head.weight"}
    missing, unexpected = base_model.load_state_dict(state, strict=False)
    assert not unexpected and all(not is_text(k) for k in missing)
    return base_model.eval()


# ---------------------------------------------------------------------- save of a loaded model
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_save_writes_the_whole_checkpoint_back(tmp_path, moe):
    """load + save: the whole model again (tensors outside the language model byte-identical, the
    config and processor files as they were, sharded); the output loads again and saves the same."""
    from transformers import AutoModelForImageTextToText

    base = vl_checkpoint(tmp_path / "base", moe=moe)
    ours = load(base, dtype=torch.float32)
    save(ours, tmp_path / "out", max_shard_size="100KB")
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 2
    model = assert_whole(tmp_path / "out", base, moe=moe)
    ref = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32).eval()
    # the same weights through the same code: logits equal, an image included
    assert torch.equal(image_logits(model), image_logits(ref))
    with torch.no_grad():
        ids = random_ids(1, 9, vocab=300)
        assert max_rel_err(ours(ids), ref(input_ids=ids).logits) <= 1e-5  # as tests/models/test_qwen35.py
    # round trip: the output is a source like any other
    save(load(tmp_path / "out", dtype=torch.float32), tmp_path / "again", max_shard_size="100KB")
    assert tensors_of(tmp_path / "again") == tensors_of(tmp_path / "out")
    assert (tmp_path / "again" / "config.json").read_text() == (tmp_path / "out" / "config.json").read_text()


def test_changed_values_reach_text_config_only(tmp_path):
    """Chat tuning sets eos to <|im_end|>; a cast writes the new dtype: only those keys change,
    in text_config (and at the top level where the input has them), every other key as it was."""
    base = vl_checkpoint(tmp_path / "base")
    ours = load(base, dtype=torch.float32)
    ours.config.eos_token_id = 151645
    save(ours, tmp_path / "out", dtype="bfloat16")
    got = json.loads((tmp_path / "out" / "config.json").read_text())
    want = json.loads((base / "config.json").read_text())
    assert got["text_config"]["eos_token_id"] == 151645 and got["text_config"]["dtype"] == "bfloat16"
    assert got["dtype"] == "bfloat16"  # the top level has the key too
    for key in ("eos_token_id", "dtype", "torch_dtype"):
        for d in (got, got["text_config"], want, want["text_config"]):
            d.pop(key, None)
    assert got == want
    # the tower keeps its own dtype (fp32 here) and bytes; the text tensors are cast
    out, src = tensors_of(tmp_path / "out"), tensors_of(base)
    assert out["model.visual.patch_embed.proj.weight"] == src["model.visual.patch_embed.proj.weight"]
    assert out[TEXT + "embed_tokens.weight"][0] == "torch.bfloat16"


@pytest.mark.parametrize("targets", ["all-linear", ["model.layers.1.self_attn.q_proj", "in_proj_qkv"]],
                         ids=["all-linear", "paths"])
def test_lora_adapter_names_the_nested_modules(tmp_path, targets):
    """An adapter trained on a vision-language checkpoint names its modules as transformers'
    ...ForConditionalGeneration holds them (base_model.model.model.language_model.layers...), the
    prefix vLLM's Qwen3.5 LoRA loader maps onto its language model (target_modules given as module
    paths too); PEFT loads it onto that class with our logits, and lora.load reads it back."""
    import lora
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    base = vl_checkpoint(tmp_path / "base")
    ours = load(base, dtype=torch.float32)
    lora.inject(ours, r=4, alpha=8, dropout=0.0, targets=targets)
    torch.manual_seed(0)
    for name, p in ours.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    lora.save(ours, tmp_path / "adapter")
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("base_model.model.model.language_model.layers.") for k in keys)
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert not any(t.startswith("model.layers.") for t in written)
    ref = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32),
                                    tmp_path / "adapter").eval()
    adapted = [n for n, _ in ref.named_modules() if n.endswith("lora_A")]
    assert len(adapted) == len(keys) // 2 and not any("visual" in n for n in adapted)
    ids = random_ids(1, 11, vocab=300)
    again = lora.load(load(base, dtype=torch.float32), tmp_path / "adapter")
    with torch.no_grad():
        want = ours(ids)
        # fp32 both, the same weights and adapter: the bound of the Qwen3.5 PEFT tests (the softmax
        # attention's summation order; measured here 2e-7)
        assert max_rel_err(ref(input_ids=ids).logits, want) <= 1e-5
        assert torch.equal(again(ids), want)


def test_changed_source_is_named(tmp_path):
    """The tensors are copied when the output is written: a source shard gone by then is one clear error."""
    from models.qwen import CheckpointError

    base = vl_checkpoint(tmp_path / "base")
    ours = load(base, dtype=torch.float32)
    (base / "model-mtp.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-mtp.safetensors: the shard .* is gone"):
        save(ours, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- memory
# The peak resident memory of load + save alone: the imports' own peak (~600 MB of torch and
# transformers, more than this tiny model ever needs) is cleared first (Linux: writing 5 to
# /proc/self/clear_refs resets VmHWM, the peak that getrusage's ru_maxrss also reports).
_PEAK = """
import sys, torch
from models.qwen import load, save
def peak():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
open("/proc/self/clear_refs", "w").write("5")
model = load(sys.argv[1], dtype=torch.float32)
save(model, sys.argv[2], max_shard_size="40MB")
print(peak())
"""


def _peak_rss(src: Path, out: Path) -> int:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", _PEAK, str(src), str(out)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stdout.split()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable peak RSS")
def test_peak_memory_does_not_grow_with_the_vision_tower(tmp_path):
    """load + save of a checkpoint whose vision tower holds 240 MB more (six 40 MB tensors, one
    shard each): the peak RSS of load + save grows by less than one 40 MB shard (the tower is never
    read on load, and copied 8 MB at a time on save). Measured: +8.4 MB (the one copy buffer); with
    the loader reading each tower tensor and dropping it, +78 MB; holding the tower would be +240 MB."""
    small = vl_checkpoint(tmp_path / "small")
    big_tower = {f"model.visual.extra.{i}.weight": torch.full((10_000_000,), float(i)) for i in range(6)}  # 40 MB each
    big = vl_checkpoint(tmp_path / "big", extra_visual=big_tower)
    del big_tower
    peaks = {name: _peak_rss(src, tmp_path / f"out-{name}") for name, src in (("small", small), ("big", big))}
    assert tensors_of(tmp_path / "out-big").keys() >= set(f"model.visual.extra.{i}.weight" for i in range(6))
    assert peaks["big"] - peaks["small"] < 40e6, peaks


def test_gguf_export_writes_the_text_model_of_a_whole_checkpoint(tmp_path):
    """A whole vision-language folder (what merge.py writes) exports as llama.cpp's text GGUF: the
    same file as the text model alone, written here by hand (names `model.language_model.*` ->
    `model.*`, the vision tower and MTP head dropped, config.json = its text_config), which
    tests/models/test_gguf_hybrid.py checks against the converter's transformations."""
    pytest.importorskip("gguf")
    from gguf import GGUFReader
    from safetensors.torch import load_file, save_file

    from models.qwen.export import export_gguf

    # llama.cpp's qwen35 loader builds every 4th layer as full attention (and nothing else)
    from tests.models.test_gguf import byte_tokenizer

    base = vl_checkpoint(tmp_path / "base", num_hidden_layers=4,
                         layer_types=["linear_attention"] * 3 + ["full_attention"])
    byte_tokenizer().save_pretrained(base)   # a GGUF carries the vocabulary (259 byte-level tokens)
    text = tmp_path / "text"
    text.mkdir()
    cfg = json.loads((base / "config.json").read_text())
    text_cfg = dict(cfg["text_config"], architectures=["Qwen3_5ForCausalLM"])
    text_cfg.setdefault("tie_word_embeddings", cfg.get("tie_word_embeddings", False))
    (text / "config.json").write_text(json.dumps(text_cfg))
    tensors = {}
    for f in sorted(base.glob("*.safetensors")):
        for k, v in load_file(f).items():
            if k.startswith("model.language_model."):
                tensors["model." + k[len("model.language_model."):]] = v
            elif k.startswith("lm_head."):
                tensors[k] = v
    save_file(tensors, text / "model.safetensors")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "qwen.tiktoken",
                 "generation_config.json", "chat_template.jinja"):
        if (base / name).exists():
            shutil.copy(base / name, text / name)
    whole_file = export_gguf(base, tmp_path / "whole.gguf").path
    text_file = export_gguf(text, tmp_path / "text.gguf").path
    a, b = GGUFReader(whole_file), GGUFReader(text_file)
    ta, tb = ({t.name: t for t in r.tensors} for r in (a, b))
    assert ta.keys() == tb.keys() and not any("visual" in n or "nextn" in n for n in ta)
    for name, x in ta.items():
        y = tb[name]
        assert x.tensor_type == y.tensor_type and x.data.tobytes() == y.data.tobytes(), name
    keys = {k for k in a.fields if not k.startswith("GGUF.") and k != "general.name"}
    assert keys == {k for k in b.fields if not k.startswith("GGUF.") and k != "general.name"}
    for k in keys:
        assert a.fields[k].contents() == b.fields[k].contents(), k


def test_text_only_checkpoint_keeps_its_mtp_head(tmp_path):
    """A qwen3_5_text checkpoint (Qwen3_5ForCausalLM) with an MTP head: save writes the head back
    byte for byte beside the text model, and transformers' class loads the result as it loaded the input."""
    from transformers import Qwen3_5ForCausalLM

    from tests.models.test_qwen35 import hf_qwen35

    hf_qwen35(seed=2).save_pretrained(tmp_path / "base")
    weights = {k: v.contiguous() for k, v in hf_qwen35(seed=2).state_dict().items()}
    save_file({**weights, **mtp_tensors(64)}, str(tmp_path / "base" / "model.safetensors"), metadata={"format": "pt"})
    save(load(tmp_path / "base", dtype=torch.float32), tmp_path / "out")
    got, want = tensors_of(tmp_path / "out"), tensors_of(tmp_path / "base")
    assert {k: v for k, v in got.items() if k.startswith("mtp.")} == {k: v for k, v in want.items() if k.startswith("mtp.")}
    assert got.keys() == want.keys()
    model, info = Qwen3_5ForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
