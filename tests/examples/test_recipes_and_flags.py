"""The stage scripts' flags as users give them, in subprocesses: a LLaMA-Factory recipe runs as
`llamafactory-cli train` would (its defaults, HF's step-count rules, HF's learning rate at every
step), every recipe key is honoured or named, flags are never abbreviated, and a bad value of
any script's flag is one line naming the flag and its range, exit 2, before anything loads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.examples.conftest import ROOT, assert_usage_error, run_script
from tests.helpers import tiny_checkpoint


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny checkpoint with Qwen's vocabulary rows (the tokenizer's 151665 tokens fit)."""
    path, _ = tiny_checkpoint(tmp_path_factory.mktemp("base") / "tiny", vocab_size=151936, tie_word_embeddings=True)
    return path


def _corpus(folder):
    folder.mkdir()
    for i in range(6):
        (folder / f"d{i}.txt").write_text(f"Sockets carry bytes {i}; json encodes objects. " * 6, encoding="utf-8")
    return folder


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


RECIPE = """\
### a LLaMA-Factory pretraining recipe that leaves lora_rank, lora_alpha, learning_rate and the
### scheduler to LLaMA-Factory's defaults
model_name_or_path: {model}
stage: pt
do_train: true
finetuning_type: lora
lora_target: all
dataset: corpus
dataset_dir: {data}
cutoff_len: 32
output_dir: {out}
overwrite_output_dir: true
per_device_train_batch_size: 2
gradient_accumulation_steps: 1
num_train_epochs: 3.0
max_steps: 3
warmup_steps: 2
gradient_checkpointing: false
optim: paged_adamw_8bit
report_to: wandb
bf16: false
"""


@pytest.mark.slow   # one 3-step CPT run: ~15 s alone, 35 s on a loaded 2-core machine
def test_llamafactory_recipe_runs_with_its_own_defaults_and_hf_semantics(tmp_path, base):
    """num_train_epochs + max_steps: max_steps trains; no lora_rank/lora_alpha: LLaMA-Factory's
    rank 8 and alpha 2 x 8; the lr of every step (the first, in the warm-up, 0) is that of
    transformers' linear schedule (LLaMA-Factory's default lr_scheduler_type) at 5e-5 (its
    default learning_rate); report_to wandb and optim paged_adamw_8bit are named and skipped;
    gradient_checkpointing false is honoured."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    corpus = _corpus(tmp_path / "corpus")
    out = tmp_path / "saves"
    cfg = tmp_path / "qwen_lora_pt.yaml"
    cfg.write_text(RECIPE.format(model=base, data=tmp_path, out=out), encoding="utf-8")
    proc = run_script("cpt.py", "--config", cfg, "--sample-tokens", "1", cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert corpus.is_dir()
    # every key honoured or named, in one line
    ignored = [line for line in proc.stderr.splitlines() if "not honoured" in line]
    assert len(ignored) == 1 and str(cfg) in ignored[0], proc.stderr
    assert "report_to: wandb" in ignored[0] and "optim: paged_adamw_8bit is not supported; training with AdamW" \
        in ignored[0]
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]          # max_steps wins over num_train_epochs
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=5e-5)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=3)
    for row in rows:
        # metrics.jsonl holds the lr as a JSON float: the same double transformers computes
        assert row["lr"] == opt.param_groups[0]["lr"], (row["step"], row["lr"])
        opt.step()
        sched.step()
    assert rows[0]["lr"] == 0.0
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"]) == (8, 16, 0.0)
    identity = json.loads((out / "run.json").read_text())["identity"]
    assert identity["no_grad_checkpointing"] is True       # gradient_checkpointing: false
    assert identity["seed"] == 42                          # HF's default seed


def test_command_line_beats_the_recipe_and_its_defaults(tmp_path, base):
    """--lora-r on the command line with a recipe that has no lora_alpha: alpha follows the
    convention of the recipe (2 x the rank in use)."""
    from cli import flags, options

    cfg = tmp_path / "r.yaml"
    cfg.write_text(f"model_name_or_path: {base}\nstage: pt\nfinetuning_type: lora\n", encoding="utf-8")
    args = flags.parse(options.parser("cpt", "test"), ["--config", str(cfg), "--lora-r", "4"], stage="cpt").args
    assert (args.lora_r, args.lora_alpha, args.lr, args.lr_scheduler, args.epochs) == (4, 8.0, 5e-5, "linear", 3.0)


CONFIG_ERRORS = [
    ("stage: pt\nlora_rank: 0\n", ["key 'lora_rank'", "positive integer"]),
    ("stage: pt\nlr_scheduler_type: cosine\nlearning_rate: fast\n", ["key 'learning_rate'", "invalid float"]),
    ("stage: pt\ngradient_checkpointing: maybe\n", ["key 'gradient_checkpointing'", "true or false"]),
    ("lora-r: 0\n", ["key 'lora-r'", "positive integer"]),
    ("seed: -1\n", ["key 'seed'", "[0, 4294967295]"]),
    ("lr-scheduler: wsd\n", ["key 'lr-scheduler'", "'wsd' is not one of cosine"]),
]
# Every numeric flag class of every script: (script, argv, what the one line names). The issue's
# own cases run as subprocesses; the whole audit runs in-process on each script's parser (a
# subprocess costs seconds of torch import each).
BAD_VALUES = [
    ("sft.py", ["--max-step", "5"], ["unrecognized arguments: --max-step"]),
    ("cpt.py", ["--block-size", "1"], ["--block-size", "integer >= 2"]),
    ("sft.py", ["--seed", "-1"], ["--seed", "[0, 4294967295]"]),
    ("dpo.py", ["--seed", str(2**70)], ["--seed", "[0, 4294967295]"]),
    ("generate.py", ["--top-p", "1.5"], ["--top-p", "(0, 1]"]),
    ("merge.py", ["--max-shard-size", "lots"], ["--max-shard-size", "5GB"]),
    ("evaluate.py", ["--max-length", "1"], ["--max-length", "integer >= 2"]),
]
AUDIT = BAD_VALUES + [
    ("cpt.py", ["--lora-rank", "8"], ["unrecognized arguments: --lora-rank"]),
    ("cpt.py", ["--max-steps", "0"], ["--max-steps", "positive integer"]),
    ("cpt.py", ["--lr", "inf"], ["--lr", "finite number > 0"]),
    ("cpt.py", ["--warmup-ratio", "1"], ["--warmup-ratio", "[0, 1)"]),
    ("cpt.py", ["--sample-temperature", "-1"], ["--sample-temperature", ">= 0"]),
    ("sft.py", ["--max-len", "1"], ["--max-len", "integer >= 2"]),
    ("sft.py", ["--eval-fraction", "1.5"], ["--eval-fraction", "[0, 1)"]),
    ("dpo.py", ["--max-prompt-len", "0"], ["--max-prompt-len", "positive integer"]),
    ("dpo.py", ["--beta", "0"], ["--beta", "finite number > 0"]),
    ("generate.py", ["--seed", "-1"], ["--seed", "[0, 4294967295]"]),
    ("generate.py", ["--top-p", "0"], ["--top-p", "finite number > 0"]),
    ("generate.py", ["--temperature", "nan"], ["--temperature", "finite number >= 0"]),
    ("generate.py", ["--max-new-tokens", "0"], ["--max-new-tokens", "positive integer"]),
    ("evaluate.py", ["--stride", "0"], ["--stride", "positive integer"]),
    ("extend_vocab.py", ["--max-tokens", "0"], ["--max-tokens", "positive integer"]),
    ("residual.py", ["--scale", "inf"], ["--scale", "finite"]),
    ("export.py", ["--typ", "q8_0"], ["unrecognized arguments: --typ"]),
]


@pytest.mark.parametrize("recipe, needles", CONFIG_ERRORS[:2])
def test_config_errors_name_the_file_and_its_key(tmp_path, recipe, needles):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(recipe, encoding="utf-8")
    line = assert_usage_error(run_script("cpt.py", "--config", cfg), str(cfg), *needles)
    assert "argument --" not in line   # the file's key, not our flag


@pytest.mark.parametrize("recipe, needles", CONFIG_ERRORS)
def test_every_config_error_names_the_key(tmp_path, recipe, needles):
    from cli.errors import UsageError
    from examples import cpt

    cfg = tmp_path / "bad.yaml"
    cfg.write_text(recipe, encoding="utf-8")
    with pytest.raises(UsageError) as e:
        cpt.main(["--config", str(cfg)])
    for n in [str(cfg)] + needles:
        assert n in str(e.value)


@pytest.mark.parametrize("script, argv, needles", BAD_VALUES)
def test_bad_flag_values_are_one_line(tmp_path, script, argv, needles):
    assert_usage_error(run_script(script, *argv, cwd=tmp_path), *needles)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("script, argv, needles", AUDIT)
def test_every_script_checks_its_flags_before_anything_runs(script, argv, needles, capsys):
    import importlib

    module = importlib.import_module(f"examples.{script[:-3]}")
    with pytest.raises(SystemExit) as e:
        module.main(argv)
    assert e.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and all(n in lines[0] for n in needles), lines


def test_dpo_prompt_longer_than_the_pair_is_refused_before_loading(tmp_path, base):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n", encoding="utf-8")
    out = tmp_path / "o"
    proc = run_script("dpo.py", "--model", base, "--data", pairs, "--out", out, "--max-len", "64",
                      "--max-prompt-len", "64")
    assert_usage_error(proc, "--max-prompt-len 64", "[1, --max-len 64)")
    assert not out.exists()


def test_merge_without_the_default_adapter_names_the_script_to_run(tmp_path):
    assert_usage_error(run_script("merge.py", cwd=tmp_path), "--adapter", "runs/cpt/adapter",
                       "run examples/cpt.py first", "--adapter DIR")


def test_qwen_tune_names_itself_in_usage_and_errors(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "examples", *args], cwd=tmp_path, capture_output=True, text=True,
                              env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})

    assert run("sft", "--help").stdout.startswith("usage: qwen-tune sft ")
    line = assert_usage_error(run("sft", "--max-step", "5"), "unrecognized arguments: --max-step")
    assert line.startswith("qwen-tune sft: error:")
    assert assert_usage_error(run("cpt", "--seed", "-1")).startswith("qwen-tune cpt: error: argument --seed")
    assert run_script("sft.py", "--help").stdout.startswith("usage: sft.py ")


def test_every_llamafactory_key_names_a_value_of_the_wrong_shape(tmp_path):
    """A YAML list or mapping (or an unparsable value) where a LLaMA-Factory key takes one value is
    one line naming the file and the key, for every key the mapping reads (was a TypeError
    traceback for `stage: [sft]`)."""
    from cli.config_file import LF_KEYS, LF_LIST_KEYS
    from cli.errors import UsageError
    from examples import cpt

    cfg = tmp_path / "bad.yaml"
    for key in sorted(LF_KEYS):
        bad = [{"a": 1}] if key in LF_LIST_KEYS else [["sft"], {"a": 1}]
        for value in bad:
            cfg.write_text(json.dumps({key: value}), encoding="utf-8")
            with pytest.raises(UsageError) as e:
                cpt.main(["--config", str(cfg)])
            assert f"{cfg}: key {key!r}" in str(e.value) and "\n" not in str(e.value), (key, value, str(e.value))
