"""The stage scripts on a Qwen3.5 vision-language checkpoint (dense and MoE; a vision tower, an MTP
head, processor files, several shards), as a user runs them: every folder they write is the whole
model. merge.py after cpt.py, the merged model of sft.py and dpo.py, and model/ of a
full-then-lora run each load in transformers' ...ForConditionalGeneration with no missing or
unexpected weights, keep every tensor outside the language model byte for byte, and their
language-model weights are W + scale·B·A of the adapter file (computed here, not by our merge);
an image + text forward equals the base's with only the language-model weights replaced."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

from tests.examples.conftest import run_script
from tests.helpers import max_rel_err
from tests.models.test_whole import assert_whole, image_logits, is_text, vl_checkpoint, with_text_of

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:.*falling back to its reference PyTorch implementation")]

COMMON = ("--batch-size", "2", "--grad-accum", "1", "--max-steps", "2", "--lr", "1e-2", "--lora-r", "4",
          "--lora-alpha", "8", "--lora-dropout", "0", "--dtype", "fp32", "--eval-fraction", "0.25")
QA = [("What is a socket?", "An endpoint for data.", "A kind of fruit."),
      ("What does json do?", "It encodes objects as text.", "It bakes bread."),
      ("What is a queue?", "A first-in first-out list.", "A type of hat.")] * 3


def cls_for(moe: bool):
    from transformers import Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration

    return Qwen3_5MoeForConditionalGeneration if moe else Qwen3_5ForConditionalGeneration


@pytest.fixture(scope="module", params=[False, True], ids=["dense", "moe"])
def inputs(request, tmp_path_factory):
    """A tiny vision-language checkpoint with Qwen's vocabulary and tokenizer (the scripts tokenise
    real text), a corpus, SFT conversations and preference pairs."""
    from models.qwen import Tokenizer

    tmp = tmp_path_factory.mktemp("qwen35-whole")
    base = vl_checkpoint(tmp / "base", moe=request.param, seed=3, shard="4MB", vocab_size=151936,
                         tie_word_embeddings=True)
    Tokenizer.default().save_pretrained(base)
    corpus = tmp / "corpus"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"doc{i}.txt").write_text(f"Document {i}: sockets, queues and json. " * 6, encoding="utf-8")
    with open(tmp / "sft.jsonl", "w", encoding="utf-8") as f:
        for q, good, _ in QA:
            f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": good}]})
                    + "\n")
    with open(tmp / "pairs.jsonl", "w", encoding="utf-8") as f:
        for q, good, bad in QA:
            f.write(json.dumps({"prompt": q, "chosen": good, "rejected": bad}) + "\n")
    return dict(moe=request.param, base=base, corpus=corpus, sft=tmp / "sft.jsonl", pairs=tmp / "pairs.jsonl",
                tmp=tmp, cache=tmp / "cache")


def run(inputs, script, *args):
    proc = run_script(script, *map(str, args), cache=inputs["cache"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def assert_merged(out, base, adapter, moe):
    """The language-model weights of `out` are base's W + scale·B·A from adapter_model.safetensors
    (float64 here), every other language-model tensor base's own bytes. Routed experts of the MoE
    (an adapter in PEFT's fused layout, target_parameters) are compared with PEFT's own merge."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    r, alpha = cfg["r"], cfg["lora_alpha"]
    scale = alpha / math.sqrt(r) if cfg["use_rslora"] else alpha / r
    lora, got, was = tensors(adapter), tensors(out), tensors(base)
    prefix = "base_model.model."
    adapted = {k[len(prefix):-len(".lora_A.weight")] for k in lora if k.endswith(".lora_A.weight")}
    modules = {m for m in adapted if m + ".weight" in was}
    assert modules and all(m.startswith("model.language_model.layers.") for m in adapted)
    for m in modules:
        A, B = lora[f"{prefix}{m}.lora_A.weight"].double(), lora[f"{prefix}{m}.lora_B.weight"].double()
        want = was[m + ".weight"].double() + scale * B @ A
        # fp32 merge: the r-term product and one addition, each rounded: <= (r + 2) * 2^-24 of the
        # weights' scale (3.6e-7 for r = 4)
        assert max_rel_err(got[m + ".weight"], want) <= (r + 2) * 2.0 ** -24, m
    fused = adapted - modules
    assert bool(fused) == moe  # (the MoE's routed experts)
    untouched = [k for k in was if is_text(k) and k[: -len(".weight")] not in modules and ".mlp.experts." not in k]
    assert untouched and all(torch.equal(got[k], was[k]) for k in untouched)
    if fused:
        from peft import PeftModel

        ref = PeftModel.from_pretrained(cls_for(moe).from_pretrained(base, dtype=torch.float32), adapter)
        want = ref.merge_and_unload().state_dict()
        mine = cls_for(moe).from_pretrained(out, dtype=torch.float32).state_dict()
        experts = [k for k in mine if ".mlp.experts." in k]
        assert experts and all(max_rel_err(mine[k], want[k]) <= (2 * r + 2) * 2.0 ** -24 for k in experts)


def assert_image_forward(out, base, moe):
    """Image + text logits of `out` equal the base's with only its language-model weights replaced
    by out's. The same weights through the same code: exactly equal for the dense model; the MoE's
    differ by 1.7e-7 (measured; transformers' grouped_mm expert kernel sums in another order for the
    two models' differently placed buffers of the same values), against > 1e-4 for the change the
    training made (checked below), so 1e-6 still catches any wrong weight."""
    model = cls_for(moe).from_pretrained(out, dtype=torch.float32).eval()
    ref = with_text_of(cls_for(moe).from_pretrained(base, dtype=torch.float32), out)
    got = image_logits(model)
    if moe:
        assert max_rel_err(got, image_logits(ref)) <= 1e-6
    else:
        assert torch.equal(got, image_logits(ref))
    plain = cls_for(moe).from_pretrained(base, dtype=torch.float32).eval()
    assert max_rel_err(got, image_logits(plain)) > 1e-4  # training changed the text model


def test_cpt_then_merge_is_whole(inputs):
    base, moe, tmp = inputs["base"], inputs["moe"], inputs["tmp"]
    run(inputs, "cpt.py", "--model", base, "--data", inputs["corpus"], "--out", tmp / "cpt", "--block-size", "32",
        "--sample-tokens", "2", *COMMON)
    keys = tensors(tmp / "cpt" / "adapter")
    assert all(k.startswith("base_model.model.model.language_model.layers.") for k in keys)
    run(inputs, "merge.py", "--adapter", tmp / "cpt" / "adapter", "--out", tmp / "merged", "--max-shard-size", "4MB")
    assert len(list((tmp / "merged").glob("model-*.safetensors"))) > 1
    assert_whole(tmp / "merged", base, moe=moe)
    assert_merged(tmp / "merged", base, tmp / "cpt" / "adapter", moe)
    assert_image_forward(tmp / "merged", base, moe)


def test_sft_and_dpo_merged_models_are_whole(inputs):
    """sft.py on the base, dpo.py on sft's merged model: each merged/ is whole (eos and pad become
    the chat ones in text_config, nothing else changes)."""
    base, moe, tmp = inputs["base"], inputs["moe"], inputs["tmp"]
    run(inputs, "sft.py", "--model", base, "--data", inputs["sft"], "--out", tmp / "sft", "--max-len", "64",
        "--sample-questions", "0", "--sample-tokens", "2", *COMMON)
    sft = tmp / "sft" / "merged"
    chat = ("eos_token_id", "pad_token_id")
    assert_whole(sft, base, moe=moe, changed_keys=chat)
    assert json.loads((sft / "config.json").read_text())["text_config"]["eos_token_id"] == 151645
    assert_merged(sft, base, tmp / "sft" / "adapter", moe)
    assert_image_forward(sft, base, moe)
    run(inputs, "dpo.py", "--model", sft, "--data", inputs["pairs"], "--out", tmp / "dpo", "--max-len", "64",
        "--sample-questions", "0", *COMMON)
    dpo = tmp / "dpo" / "merged"
    assert_whole(dpo, sft, moe=moe)
    assert_merged(dpo, sft, tmp / "dpo" / "adapter", moe)
    assert_image_forward(dpo, sft, moe)


def test_full_then_lora_model_is_whole(inputs):
    """model/ of a full-then-lora run (the full phase's model, written as full mode writes it) is
    whole, and its adapter names the nested modules."""
    if inputs["moe"]:
        pytest.skip("the export path is the family's own; the dense run covers it")
    base, tmp = inputs["base"], inputs["tmp"]
    run(inputs, "cpt.py", "--model", base, "--data", inputs["corpus"], "--out", tmp / "ftl", "--block-size", "32",
        "--sample-tokens", "2", "--finetuning", "full-then-lora", *COMMON, "--warmup-steps", "0")
    # (no warm-up: the one full-phase step would otherwise run at lr 0, HF's warm-up start)
    model = assert_whole(tmp / "ftl" / "model", base)
    assert all(k.startswith("base_model.model.model.language_model.") for k in tensors(tmp / "ftl" / "adapter"))
    was = tensors(base)
    changed = [k for k, v in model.state_dict().items() if is_text(k) and k in was and not torch.equal(v, was[k])]
    assert changed  # the full phase trained the text model
    assert_image_forward(tmp / "ftl" / "model", base, False)
