"""Bad input to the example scripts: one line on stderr naming the flag/file, exit code 2,
no traceback, nothing written or overwritten. Plus --help and --config handling."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.examples.conftest import assert_usage_error, run_script, tree_digest
from tests.helpers import tiny_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import _cli  # noqa: E402


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


# ---------------------------------------------------------------------- in-process: the parser
def _parse(argv, sft=False):
    p = _cli.new_parser("cpt.py", "test")
    _cli.add_training_flags(p, sft=sft)
    args = _cli.parse_args(p, argv)
    _cli.check_training_flags(args)
    return args


def test_config_file_fills_flags_and_command_line_wins(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lora-r: 8\nlr: 3.0e-4\nqlora: true\ndata: [a.txt, b.txt]\nmax_steps: 7\n", encoding="utf-8")
    args = _parse(["--config", str(cfg), "--lr", "1e-3"])
    assert (args.lora_r, args.lr, args.qlora, args.data, args.max_steps) == (8, 1e-3, True, ["a.txt", "b.txt"], 7)
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"batch_size": 3, "no-grad-checkpointing": True}), encoding="utf-8")
    args = _parse(["--config", str(js)])
    assert args.batch_size == 3 and args.no_grad_checkpointing is True


@pytest.mark.parametrize(
    "text, suffix, needles",
    [
        ("lora-rank: 8\n", ".yaml", ["unknown key 'lora-rank'"]),
        ("lr: [1, 2]\n", ".yaml", ["key 'lr'", "single value"]),
        ("lr: 1e-4\n  bad: : indent\n", ".yaml", ["line 2", "invalid YAML"]),
        ('{"lr": 1e-4,}', ".json", ["line 1", "invalid JSON"]),
        ("- 1\n- 2\n", ".yaml", ["expected a mapping"]),
        ("qlora: maybe\n", ".yaml", ["key 'qlora'", "true or false"]),
    ],
)
def test_bad_config_files(tmp_path, text, suffix, needles):
    cfg = tmp_path / f"c{suffix}"
    cfg.write_text(text, encoding="utf-8")
    with pytest.raises(_cli.UsageError) as e:
        _parse(["--config", str(cfg)])
    for n in needles + [str(cfg)]:
        assert n in str(e.value)


def test_conflicts_through_config_are_caught(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 2\n", encoding="utf-8")
    with pytest.raises(_cli.UsageError, match="--epochs and --max-steps"):
        _parse(["--config", str(cfg), "--max-steps", "5"])


def test_run_identity_guard(tmp_path):
    out = tmp_path / "out"
    ident = {"lr": 1e-4, "model": "m"}
    _cli.prepare_out_dir(out, ident, resume=False, overwrite=False)  # missing: fine
    _cli.write_run_file(out, ident)
    with pytest.raises(_cli.UsageError, match="already holds this run; pass --resume"):
        _cli.prepare_out_dir(out, ident, resume=False, overwrite=False)
    _cli.prepare_out_dir(out, ident, resume=True, overwrite=False)  # same run + --resume: fine
    with pytest.raises(_cli.UsageError, match=r"different run \(--lr was 0.0001, now 0.0002\)"):
        _cli.prepare_out_dir(out, dict(ident, lr=2e-4), resume=True, overwrite=False)
    assert (out / _cli.RUN_FILE).is_file()
    _cli.prepare_out_dir(out, dict(ident, lr=2e-4), resume=False, overwrite=True)
    assert not out.exists()


# ---------------------------------------------------------------------- subprocess: the scripts
@pytest.mark.parametrize("name", ["cpt.py", "sft.py", "merge.py", "generate.py"])
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
    elif name == "merge.py":
        flags += ["--model", "--adapter", "--out", "--into"]
    else:
        flags += ["--model", "--adapter", "--prompt", "--compare"]
    for f in flags:
        assert f in proc.stdout, f
    # every option has a help text (argparse prints the flag then its help on the same/next line)
    assert "(default:" in proc.stdout


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
        (["--epochs", "1", "--max-steps", "5"], ["--epochs", "--max-steps"]),
        (["--warmup-steps", "3", "--warmup-ratio", "0.1"], ["--warmup-ratio", "--warmup-steps"]),
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
    _cli.write_run_file(out, {"stage": "cpt", "lr": 0.5})
    before = tree_digest(out)
    proc = run_script("cpt.py", "--model", ckpt, "--data", corpus, "--out", out, "--max-steps", "1")
    assert_usage_error(proc, "--out", str(out), "different run")
    proc = run_script("cpt.py", "--model", ckpt, "--data", corpus, "--out", out, "--max-steps", "1", "--resume")
    assert_usage_error(proc, "--out", "different run")
    assert tree_digest(out) == before
    # A non-empty directory that is not a run at all is never adopted either.
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    proc = run_script("cpt.py", "--model", ckpt, "--data", corpus, "--out", other)
    assert_usage_error(proc, "--out", "holds no run")
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
