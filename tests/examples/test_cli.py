"""Bad input to the example scripts: one line on stderr naming the flag/file, exit code 2,
no traceback, nothing written or overwritten. Plus --help and --config handling."""

from __future__ import annotations

import json

import pytest

from tests.examples.conftest import assert_usage_error, run_script, tree_digest
from tests.helpers import tiny_checkpoint

from cli import outdir


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path, _ = tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")
    return path


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.txt").write_text("Sockets carry bytes between processes.\n", encoding="utf-8")
    return d


# ---------------------------------------------------------------------- subprocess: the scripts
@pytest.mark.parametrize("name", ["cpt.py", "sft.py", "merge.py", "generate.py", "residual.py", "evaluate.py",
                                  "extend_vocab.py"])
def test_help_documents_every_flag(name):
    proc = run_script(name, "--help")
    assert proc.returncode == 0, proc.stderr
    flags = ["--config"]
    if name in ("cpt.py", "sft.py"):
        flags += ["--model", "--data", "--out", "--qlora", "--lora-r", "--lora-alpha", "--lora-dropout",
                  "--lora-targets", "--lr", "--warmup-steps", "--warmup-ratio", "--epochs", "--max-steps",
                  "--batch-size", "--grad-accum", "--dtype", "--no-grad-checkpointing", "--eval-every",
                  "--save-every", "--keep-last", "--resume", "--seed"]
        flags += ["--block-size"] if name == "cpt.py" else ["--max-len"]
        flags += ["--finetuning", "--full-fraction", "--fsdp", "--report-to", "--log-every", "embedded default"]
    elif name == "merge.py":
        flags += ["--model", "--adapter", "--out", "--into", "--gguf"]
    elif name == "generate.py":
        flags += ["--model", "--adapter", "--prompt", "--compare"]
    elif name == "residual.py":
        flags += ["--base", "--chat", "--target", "--out", "--scale"]
    for f in flags:
        assert f in proc.stdout, f
    assert "(default:" in proc.stdout and "(default: None)" not in proc.stdout


def shown_defaults(help_text: str) -> dict[str, str]:
    """{"--flag": "X"} for every option whose --help entry ends in "(default: X)"."""
    import re

    entries = re.split(r"\n  (?=-)", help_text)      # one option's (wrapped) entry each
    out = {}
    for entry in entries:
        flat = " ".join(entry.split("\n\n")[0].split())   # (not the next group's heading)
        found = re.search(r"\(default: ([^()]*)\)", flat)   # not "(embedded default: Y)"
        if found and flat.startswith("--"):
            out[flat.split()[0].rstrip(",")] = found.group(1).split(";")[0]   # "X; embedded default: Y"
    return out


# Where a run records what it used for each flag: train_config.json (the Trainer's settings) and
# the adapter's adapter_config.json. (--log-every's default is described, "about 20 lines per run".)
USED = {"--lr": ("train", "lr"), "--batch-size": ("train", "batch_size"), "--grad-accum": ("train", "grad_accum"),
        "--max-grad-norm": ("train", "max_grad_norm"), "--weight-decay": ("train", "weight_decay"),
        "--seed": ("train", "seed"), "--lr-scheduler": ("train", "lr_scheduler"), "--keep-last": ("train", "keep_last"),
        "--report-to": ("train", "report_to"),
        "--finetuning": ("train", "mode"), "--lora-r": ("adapter", "r"), "--lora-alpha": ("adapter", "lora_alpha"),
        "--lora-dropout": ("adapter", "lora_dropout"), "--warmup-ratio": ("train", "warmup_ratio")}


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["cpt.py", "sft.py"])
def test_help_shows_the_defaults_a_run_uses(stage, tmp_path):
    """Each default --help shows is the value a run given no such flag trains with (read back
    from what the run wrote), not just a string the parser printed."""
    base, _ = tiny_checkpoint(tmp_path / "base", vocab_size=151936, tie_word_embeddings=True, hidden_size=16,
                              head_dim=8, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32)
    if stage == "cpt.py":
        data = tmp_path / "corpus"
        data.mkdir()
        (data / "a.txt").write_text("Sockets carry bytes between processes. " * 30, encoding="utf-8")
        sized = ["--block-size", "16"]
    else:
        data = tmp_path / "sft.jsonl"
        data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Q{i}?"},
                                                         {"role": "assistant", "content": f"A{i}."}]}) + "\n"
                                for i in range(4)), encoding="utf-8")
        sized = ["--max-len", "64", "--sample-questions", "1"]
    shown = shown_defaults(run_script(stage, "--help").stdout)
    assert set(USED) - {"--warmup-ratio"} <= set(shown), set(USED) - set(shown)
    out = tmp_path / "out"
    proc = run_script(stage, "--model", base, "--data", data, "--out", out, "--max-steps", "1", "--sample-tokens", "1",
                      *sized, cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    used = {"train": json.loads((out / "train_config.json").read_text()),
            "adapter": json.loads((out / "adapter" / "adapter_config.json").read_text())}
    # "--warmup-steps ... (default: --warmup-ratio 0.03)": a default stated as another flag's value
    shown.update(dict(text.split(" ", 1) for text in list(shown.values()) if text.startswith("--")))
    checked = [flag for flag in USED if flag in shown]
    assert "--warmup-ratio" in checked
    for flag in checked:
        where, key = USED[flag]
        value, text = used[where][key], shown[flag]
        assert (float(text) == value) if isinstance(value, (int, float)) else (text == str(value)), (flag, text, value)


def test_nonexistent_data_path(tmp_path, ckpt):
    out = tmp_path / "out"
    proc = run_script("cpt.py", "--model", ckpt, "--data", tmp_path / "missing.txt", "--out", out)
    assert_usage_error(proc, "--data", "missing.txt", "no such file")
    assert not out.exists()


def test_model_dir_that_is_not_qwen(tmp_path, corpus):
    bad = tmp_path / "llama"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    proc = run_script("cpt.py", "--model", bad, "--data", corpus, "--out", tmp_path / "o")
    assert_usage_error(proc, "--model", str(bad), "not a Qwen checkpoint", "llama")
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_script("cpt.py", "--model", empty, "--data", corpus, "--out", tmp_path / "o")
    assert_usage_error(proc, "--model", "no config.json")
    proc = run_script("merge.py", "--model", bad, "--adapter", empty, "--out", tmp_path / "o")
    assert_usage_error(proc, "--adapter", "not a PEFT adapter")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "flags, needles",
    [
        (["--warmup-steps", "9", "--max-steps", "5"], ["--warmup-steps 9 is larger than --max-steps 5"]),
        (["--lr", "fast"], ["--lr", "invalid float"]),
        (["--lora-r", "0"], ["--lora-r", "positive"]),
        (["--resume", "--overwrite"], ["--resume", "--overwrite"]),
    ],
)
def test_conflicting_or_invalid_flags(tmp_path, ckpt, corpus, flags, needles):
    proc = run_script("cpt.py", "--model", ckpt, "--data", corpus, "--out", tmp_path / "o", *flags)
    assert_usage_error(proc, *needles)
    assert not (tmp_path / "o").exists()


def test_out_holding_a_different_run_is_untouched(tmp_path, ckpt, corpus):
    out = tmp_path / "out"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"weights of another run")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    outdir.write_marker(out, "cpt", {"stage": "cpt", "lr": 0.5})
    before = tree_digest(out)
    proc = run_script("cpt.py", "--model", ckpt, "--data", corpus, "--out", out, "--max-steps", "1")
    assert_usage_error(proc, "--out", str(out), "different run")
    proc = run_script("cpt.py", "--model", ckpt, "--data", corpus, "--out", out, "--max-steps", "1", "--resume")
    assert_usage_error(proc, "--out", "different run")
    assert tree_digest(out) == before   # refused before anything (even the lock file) was written
    # A non-empty directory that is not a run at all is never adopted either.
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    proc = run_script("cpt.py", "--model", ckpt, "--data", corpus, "--out", other)
    assert_usage_error(proc, "--out", "was not written by these scripts")
    assert (other / "thesis.tex").read_text() == "precious" and len(list(other.iterdir())) == 1


def test_sft_and_generate_without_stage1_outputs(tmp_path):
    proc = run_script("sft.py", cwd=tmp_path)
    assert_usage_error(proc, "--model", "runs/cpt-merged", "cpt.py")
    proc = run_script("generate.py", cwd=tmp_path)
    assert_usage_error(proc, "--model", "runs/cpt-merged")
    proc = run_script("merge.py", cwd=tmp_path)
    assert_usage_error(proc, "--adapter", "runs/cpt/adapter")
    assert not (tmp_path / "runs").exists()


def test_model_vocabulary_smaller_than_the_tokenizer(tmp_path, ckpt, corpus):
    out = tmp_path / "o"
    proc = run_script("cpt.py", "--model", ckpt, "--data", corpus, "--out", out, "--max-steps", "1",
                      cache=tmp_path / "cache")
    assert_usage_error(proc, "--model", "320 vocabulary rows", "151665")
    assert not out.exists()


def test_finetuning_full_then_lora_from_the_command_line(tmp_path):
    """--finetuning full-then-lora --full-fraction 0.5: out/model (complete, with the tokenizer) and
    out/adapter on it, as PEFT loads them; the same keys in --config."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, _ = tiny_checkpoint(tmp_path / "base", vocab_size=151936, tie_word_embeddings=True)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"d{i}.txt").write_text(f"Sockets carry bytes {i}; json encodes objects. " * 6, encoding="utf-8")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("finetuning: full-then-lora\nfull-fraction: 0.5\n", encoding="utf-8")
    out = tmp_path / "run"
    proc = run_script("cpt.py", "--model", base, "--data", corpus, "--out", out, "--config", cfg, "--block-size", "32",
                      "--batch-size", "2", "--grad-accum", "1", "--max-steps", "4", "--lr", "1e-2", "--lora-r", "4",
                      "--dtype", "fp32", "--eval-fraction", "0", "--sample-tokens", "1", cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "all parameters for 2 steps, then LoRA" in proc.stdout
    assert AutoTokenizer.from_pretrained(out / "model").encode("Hello world") == [9707, 1879]
    full_phase = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)
    adapted = PeftModel.from_pretrained(full_phase, out / "adapter").eval()
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str((out / "model").resolve())
    with torch.no_grad():
        assert torch.isfinite(adapted(torch.tensor([[9707, 1879]])).logits).all()


def test_qwen_tune_entry_point_runs_each_stage():
    """`qwen-tune <stage>` (the console script; here `python -m examples`, the same main) runs the
    stage script: its --help, its one-line errors, its exit codes."""
    import subprocess
    import sys

    from tests.examples.conftest import ROOT

    def run(*args):
        return subprocess.run([sys.executable, "-m", "examples", *args], cwd=ROOT, capture_output=True, text=True)

    listing = run("--help")
    assert listing.returncode == 0
    for stage in ("cpt", "merge", "sft", "dpo", "kto", "generate", "export", "evaluate", "residual", "extend_vocab",
                  "delta"):
        assert f"  {stage}" in listing.stdout
    assert "--finetuning" in run("sft", "--help").stdout
    proc = run("dpo", "--model", "/nonexistent")
    assert proc.returncode == 2 and proc.stderr.strip() == "qwen-tune dpo: error: --model /nonexistent: directory not found"
    bad = run("frobnicate")
    assert bad.returncode == 2 and "unknown command 'frobnicate'" in bad.stderr
