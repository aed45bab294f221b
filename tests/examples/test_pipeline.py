"""The whole two-stage pipeline on a tiny model, through the scripts as a user runs them:
cpt.py -> merge.py -> sft.py -> generate.py (subprocesses, small flags).

The saved outputs are then checked against the reference stack: the merged and SFT models
load in transformers (AutoModelForCausalLM + AutoTokenizer from the saved files) with the
same logits as our loader, and the adapters load in PEFT, where base + adapter gives the
logits of the model merge.py wrote.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.examples.conftest import assert_usage_error, run_script, tree_digest
from tests.helpers import max_rel_err, tiny_checkpoint

TEXTS = [
    "A socket is an endpoint for sending or receiving data across a computer network.",
    "The json module encodes Python objects as JSON text and decodes JSON text into objects.",
    "An event loop runs asynchronous tasks and callbacks, performs network IO operations, "
    "and runs subprocesses.",
    "HTTP is a request-response protocol: a client sends a request and the server answers.",
    "A queue is a first-in, first-out data structure used to pass work between threads.",
    "TLS wraps a socket to provide encryption and peer authentication.",
    "The csv module reads and writes tabular data in comma-separated values format.",
    "A URL names a resource: scheme, network location, path, query and fragment.",
    "Base64 encodes binary data as printable ASCII characters, four for every three bytes.",
    "A thread pool executor runs callables concurrently on a fixed number of worker threads.",
]
QA = [
    ("What does json.dumps do?", "It serializes an object to a JSON formatted string."),
    ("What is a socket?", "An endpoint for sending or receiving data across a network."),
    ("What does base64 do?", "It encodes binary data as printable ASCII text."),
    ("What is an event loop?", "It runs asynchronous tasks and callbacks."),
    ("What is TLS?", "A protocol that encrypts a socket connection."),
    ("What is a queue?", "A first-in, first-out structure for passing work."),
    ("What does csv do?", "It reads and writes comma-separated values."),
    ("What is a URL?", "A name for a resource on a network."),
]
PROMPTS = ["The json module encodes", "A socket is an endpoint"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Run the four scripts once; returns the paths (each step asserts exit code 0)."""
    tmp = tmp_path_factory.mktemp("pipeline")
    cache = tmp / "cache"
    base, _ = tiny_checkpoint(tmp / "base", vocab_size=151936, tie_word_embeddings=True)
    corpus = tmp / "corpus"
    corpus.mkdir()
    for i, text in enumerate(TEXTS):
        (corpus / f"doc{i:02d}.txt").write_text((text + " ") * 3, encoding="utf-8")
    sft_data = tmp / "sft.jsonl"
    with open(sft_data, "w", encoding="utf-8") as f:
        for q, a in QA:
            f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n")
    p = dict(tmp=tmp, cache=cache, base=base, corpus=corpus, sft_data=sft_data,
             cpt=tmp / "cpt", merged=tmp / "merged", sft=tmp / "sft")
    logs = {}

    common = ["--batch-size", "2", "--grad-accum", "1", "--lr", "1e-2", "--lora-r", "4", "--lora-alpha", "8",
              "--max-steps", "2", "--dtype", "fp32", "--eval-fraction", "0.25"]
    proc = run_script("cpt.py", "--model", base, "--data", corpus, "--out", p["cpt"], "--block-size", "32",
                      "--save-every", "1", "--sample-tokens", "3", *common, cache=cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs["cpt"] = proc.stdout
    proc = run_script("merge.py", "--adapter", p["cpt"] / "adapter", "--out", p["merged"], cache=cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs["merge"] = proc.stdout
    proc = run_script("sft.py", "--model", p["merged"], "--data", sft_data, "--out", p["sft"], "--max-len", "96",
                      "--sample-questions", "1", "--sample-tokens", "3", *common, cache=cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs["sft"] = proc.stdout
    proc = run_script("generate.py", "--model", p["merged"], "--adapter", p["sft"] / "adapter", "--compare",
                      "--prompt", "What is a socket?", "--max-new-tokens", "4", cache=cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs["generate"] = proc.stdout
    p["logs"] = logs
    return p


def _ids(tok_texts, tok):
    return [torch.tensor([tok.encode(t)]) for t in tok_texts]


def test_stage1_outputs_and_report(pipeline):
    cpt = pipeline["cpt"]
    for f in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/tokenizer_config.json",
              "adapter/tokenizer.json", "metrics.jsonl", "run.json"):
        assert (cpt / f).is_file(), f
    assert sorted(d.name for d in (cpt / "checkpoints").iterdir()) == ["step-1", "step-2"]
    rows = [json.loads(l) for l in (cpt / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    out = pipeline["logs"]["cpt"]
    assert "held-out perplexity before CPT" in out and "held-out perplexity: before" in out
    assert "loss curve" in out and "sample after" in out and str(cpt / "adapter") in out
    assert "drift" in pipeline["logs"]["merge"]
    gen = pipeline["logs"]["generate"]
    assert gen.count("| tuned") == 1 and "[base]" not in gen and "[tuned]" not in gen   # each answer once


def test_cpt_adapter_loads_in_peft_and_merge_matches_it(pipeline):
    """PEFT(base, adapter) == transformers(merged files) == our load(merged files)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.qwen import Tokenizer, load

    merged = pipeline["merged"]
    hf_tok = AutoTokenizer.from_pretrained(merged)
    tok = Tokenizer.from_pretrained(merged)
    for text in PROMPTS + ["def f(x):\n    return x  # 注释"]:
        assert hf_tok(text)["input_ids"] == tok.encode(text)
    ids = _ids(PROMPTS, tok)

    base = AutoModelForCausalLM.from_pretrained(pipeline["base"], dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, pipeline["cpt"] / "adapter").eval()
    hf_merged = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    ours = load(merged, dtype=torch.float32)
    with torch.no_grad():
        for x in ids:
            ref = peft_model(x).logits
            # observed 3.9e-7 (26x margin); ours against transformers on the same weights: 0.0
            assert max_rel_err(hf_merged(x).logits, ref) < 1e-5
            assert max_rel_err(ours(x), hf_merged(x).logits) < 1e-5


def test_adapter_changed_the_model(pipeline):
    from transformers import AutoModelForCausalLM

    from models.qwen import Tokenizer

    tok = Tokenizer.from_pretrained(pipeline["merged"])
    x = _ids(PROMPTS[:1], tok)[0]
    base = AutoModelForCausalLM.from_pretrained(pipeline["base"], dtype=torch.float32).eval()
    merged = AutoModelForCausalLM.from_pretrained(pipeline["merged"], dtype=torch.float32).eval()
    with torch.no_grad():
        assert max_rel_err(merged(x).logits, base(x).logits) > 1e-4


def test_sft_model_eos_and_reference_logits(pipeline):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.qwen import load

    sft = pipeline["sft"]
    for d in (sft / "merged", sft / "adapter"):
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        assert cfg["eos_token"] == "<|im_end|>"
        assert AutoTokenizer.from_pretrained(d).eos_token_id == 151645
    assert json.loads((sft / "merged" / "config.json").read_text())["eos_token_id"] == 151645
    assert json.loads((sft / "merged" / "generation_config.json").read_text())["eos_token_id"] == 151645

    hf_tok = AutoTokenizer.from_pretrained(sft / "merged")
    messages = [{"role": "user", "content": "What is a socket?"}]
    text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    x = torch.tensor([hf_tok(text)["input_ids"]])
    stage1 = AutoModelForCausalLM.from_pretrained(pipeline["merged"], dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(stage1, sft / "adapter").eval()
    hf_sft = AutoModelForCausalLM.from_pretrained(sft / "merged", dtype=torch.float32).eval()
    ours = load(sft / "merged", dtype=torch.float32)
    with torch.no_grad():
        ref = peft_model(x).logits
        # observed 2.9e-7 here and below (35x margin)
        assert max_rel_err(hf_sft(x).logits, ref) < 1e-5
        assert max_rel_err(ours(x), ref) < 1e-5
    assert hf_sft.generation_config.eos_token_id == 151645


def test_rerun_without_resume_or_with_other_flags_is_refused(pipeline):
    cpt = pipeline["cpt"]
    before = tree_digest(cpt)
    args = ["--model", pipeline["base"], "--data", pipeline["corpus"], "--out", cpt, "--block-size", "32",
            "--save-every", "1", "--sample-tokens", "3", "--batch-size", "2", "--grad-accum", "1", "--lr", "1e-2",
            "--lora-r", "4", "--lora-alpha", "8", "--dtype", "fp32", "--eval-fraction", "0.25"]
    proc = run_script("cpt.py", *args, "--max-steps", "2", cache=pipeline["cache"])
    assert_usage_error(proc, "--out", "already holds this run", "--resume")
    proc = run_script("cpt.py", *args, "--max-steps", "3", cache=pipeline["cache"])
    assert_usage_error(proc, "--out", "different run", "--max-steps")
    assert tree_digest(cpt) == before


def test_qlora_stage1_merges_into_the_original_weights(pipeline, tmp_path):
    """cpt.py --qlora, then merge.py: the merged model is the *original* (unquantised) base +
    the adapter, as PEFT computes it on the unquantised transformers model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from models.qwen import Tokenizer

    out, merged = tmp_path / "qcpt", tmp_path / "qmerged"
    proc = run_script("cpt.py", "--model", pipeline["base"], "--data", pipeline["corpus"], "--out", out, "--qlora",
                      "--block-size", "32", "--batch-size", "2", "--grad-accum", "1", "--lr", "1e-2", "--lora-r", "4",
                      "--max-steps", "1", "--warmup-steps", "0", "--dtype", "fp32", "--eval-fraction", "0.25",
                      "--sample-tokens", "2", cache=pipeline["cache"])   # no warm-up: the one step moves B (lr > 0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "run.json").read_text())["identity"]["qlora"] is True
    proc = run_script("merge.py", "--adapter", out / "adapter", "--out", merged, cache=pipeline["cache"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "original" in proc.stdout and "NF4 rounding" in proc.stdout
    tok = Tokenizer.from_pretrained(merged)
    x = _ids(PROMPTS[:1], tok)[0]
    base = AutoModelForCausalLM.from_pretrained(pipeline["base"], dtype=torch.float32)
    ref = PeftModel.from_pretrained(base, out / "adapter").eval()
    hf_merged = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    with torch.no_grad():
        # observed 3.6e-7 (28x margin)
        assert max_rel_err(hf_merged(x).logits, ref(x).logits) < 1e-5


@pytest.mark.parametrize("stage", ["sft.py", "dpo.py"])
def test_qlora_sft_and_dpo_write_merged_into_the_original_weights(pipeline, tmp_path, stage):
    """sft.py / dpo.py --qlora: merged/ is the *original* (unquantised) base + the adapter, as PEFT
    computes it on the unquantised transformers model, and as merge.py would write it (it was the
    NF4-rounded base: logits 0.14 off PEFT's on a tiny Qwen3-Next)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from models.qwen import Tokenizer

    out = tmp_path / "q"
    data = pipeline["sft_data"]
    if stage == "dpo.py":
        data = tmp_path / "pairs.jsonl"
        rows = [json.loads(l) for l in pipeline["sft_data"].read_text().splitlines()]
        data.write_text("".join(json.dumps({"prompt": r["messages"][0]["content"], "chosen": r["messages"][1]["content"],
                                            "rejected": rows[(i + 1) % len(rows)]["messages"][1]["content"]}) + "\n"
                                for i, r in enumerate(rows)))
    proc = run_script(stage, "--model", pipeline["merged"], "--data", data, "--out", out, "--qlora",
                      "--max-len", "96", "--batch-size", "2", "--grad-accum", "1", "--lr", "1e-2", "--lora-r", "4",
                      "--max-steps", "1", "--warmup-steps", "0", "--dtype", "fp32", "--eval-fraction", "0.25",
                      "--sample-questions", "1", "--sample-tokens", "2", cache=pipeline["cache"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    tok = Tokenizer.from_pretrained(out / "merged")
    x = _ids(PROMPTS[:1], tok)[0]
    base = AutoModelForCausalLM.from_pretrained(pipeline["merged"], dtype=torch.float32)
    ref = PeftModel.from_pretrained(base, out / "adapter").eval()
    hf_merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    untouched = AutoModelForCausalLM.from_pretrained(pipeline["merged"], dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(x).logits
        assert max_rel_err(hf_merged(x).logits, want) < 1e-5       # the merge's fp32 fold (measured < 1e-6)
        assert max_rel_err(untouched(x).logits, want) > 1e-4       # and the adapter moved the model
