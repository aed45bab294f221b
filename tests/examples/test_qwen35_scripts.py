"""The stage scripts on a Qwen3.5 checkpoint (hybrid Gated DeltaNet + gated attention), as a user
runs them: cpt.py --qlora then merge.py (the merged folder loads in transformers with PEFT's
base + adapter logits), and cpt.py under torchrun with FSDP2 equal to one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.examples.conftest import EXAMPLES, ROOT, run_script
from tests.helpers import max_rel_err, random_ids

pytestmark = pytest.mark.filterwarnings("ignore:.*falling back to its reference PyTorch implementation")

CPT = ("--block-size", "32", "--grad-accum", "2", "--max-steps", "2", "--lr", "1e-2", "--lora-r", "4",
       "--lora-dropout", "0", "--dtype", "fp32", "--eval-fraction", "0.25", "--sample-tokens", "2")


def script_inputs(tmp_path_factory, name: str, build):
    """(base, corpus, cache): `build(seed=, vocab_size=, tie_word_embeddings=)`'s tiny transformers
    model with Qwen's vocabulary (the scripts tokenise real text), saved by transformers, and a
    small corpus."""
    tmp = tmp_path_factory.mktemp(name)
    build(seed=3, vocab_size=151936, tie_word_embeddings=True).save_pretrained(tmp / "base")
    corpus = tmp / "corpus"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"doc{i}.txt").write_text(f"Document {i}: sockets, queues and json. " * 6, encoding="utf-8")
    return tmp / "base", corpus, tmp / "cache"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny Qwen3_5ForCausalLM and a small corpus (script_inputs)."""
    from tests.models.test_qwen35 import hf_qwen35

    return script_inputs(tmp_path_factory, "qwen35-scripts", hf_qwen35)


def test_qlora_cpt_and_merge(inputs, tmp_path):
    qlora_cpt_and_merge(*inputs, tmp_path, "Qwen3_5ForCausalLM")


def qlora_cpt_and_merge(base, corpus, cache, tmp_path, architecture: str):
    """cpt.py --qlora on `base`, then merge.py: the merged folder loads in transformers as
    `architecture` with the logits of PEFT's base + adapter (to 1e-5 of the largest: the QLoRA
    adapter merged into the 16-bit weights against PEFT's unmerged forward). Returns the cpt.py run's
    folder."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "cpt"
    proc = run_script("cpt.py", "--model", base, "--data", corpus, "--out", out, "--qlora", "--batch-size", "2", *CPT,
                      cache=cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "base in NF4" in proc.stdout
    proc = run_script("merge.py", "--adapter", out / "adapter", "--out", tmp_path / "merged", cache=cache)
    assert proc.returncode == 0, proc.stderr[-3000:]

    ids = random_ids(1, 12, vocab=151936)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert type(merged).__name__ == architecture
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), out / "adapter")
    ref.eval()
    with torch.no_grad():
        # observed 2.5e-7 (40x margin)
        assert max_rel_err(merged(ids).logits, ref(ids).logits) <= 1e-5
        with ref.disable_adapter():
            assert max_rel_err(merged(ids).logits, ref(ids).logits) > 1e-4  # the adapter did change it
    return out


def test_fsdp_under_torchrun_equals_one_process(inputs, tmp_path):
    """2 processes x 1 x 2 with --fsdp (LoRA) against 1 process x 2 x 2: the same losses and adapter."""
    assert any("linear_attn" in k for k in fsdp_equals_one_process(*inputs, tmp_path))


def fsdp_equals_one_process(base, corpus, cache, tmp_path) -> dict:
    """cpt.py on 2 processes x 1 x 2 with --fsdp against 1 process x 2 x 2: the same losses and
    adapter tensors (returned, as one process wrote them)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", QWEN_TUNE_DIST_TIMEOUT="60",
               QWEN_TUNE_CACHE=str(cache), PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    runs = {"two": (2, "1", ["--fsdp"]), "one": (1, "2", [])}
    for name, (processes, batch, extra) in runs.items():
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
                    if processes > 1 else [sys.executable])
        cmd = [*launcher, str(EXAMPLES / "cpt.py"), "--model", str(base), "--data", str(corpus),
               "--out", str(tmp_path / name), "--batch-size", batch, *CPT, *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
        assert proc.returncode == 0, f"{proc.stderr[:3000]}\n...\n{proc.stderr[-2000:]}"

    def losses(out):
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in rows if "loss" in r]

    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 2
    for (s1, l1), (s2, l2) in zip(one, two):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-5)
    a1 = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    a2 = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert a1.keys() == a2.keys()
    for k in a1:
        # observed 0.018 of the allclose bound (55x margin)
        assert torch.allclose(a1[k], a2[k], rtol=1e-4, atol=1e-6), k
    return a1
