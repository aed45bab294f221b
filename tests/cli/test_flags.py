"""The flag layer in-process: --config (our names and LLaMA-Factory's), conflicts, --help."""

from __future__ import annotations

import json

import pytest

from cli import flags, options, runtime
from cli.errors import UsageError


def _parsed(argv, stage="cpt") -> flags.Parsed:
    parsed = flags.parse(options.parser(stage, "test"), argv, stage=stage)
    flags.check_training_flags(parsed.args)
    return parsed


def _parse(argv, stage="cpt"):
    return _parsed(argv, stage).args


def test_config_file_fills_flags_and_command_line_wins(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lora-r: 8\nlr: 3.0e-4\nqlora: true\ndata: [a.txt, b.txt]\nmax_steps: 7\n", encoding="utf-8")
    args, given = _parsed(["--config", str(cfg), "--lr", "1e-3"])
    assert (args.lora_r, args.lr, args.qlora, args.data, args.max_steps) == (8, 1e-3, True, ["a.txt", "b.txt"], 7)
    assert {"lora_r", "lr", "qlora", "data", "max_steps"} <= given
    assert not any(k.startswith("_") for k in vars(args))   # provenance never reaches run.json
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"batch_size": 3, "no-grad-checkpointing": True}), encoding="utf-8")
    args = _parse(["--config", str(js)])
    assert args.batch_size == 3 and args.no_grad_checkpointing is True


@pytest.mark.parametrize(
    "text, suffix, needles",
    [
        ("lora-rnk: 8\n", ".yaml", ["unknown key 'lora-rnk'"]),
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
    with pytest.raises(UsageError) as e:
        _parse(["--config", str(cfg)])
    for n in needles + [str(cfg)]:
        assert n in str(e.value)


def test_steps_win_over_epochs_and_ratio_as_in_hf(tmp_path):
    """HF's Trainer: max_steps > 0 overrides num_train_epochs, warmup_steps overrides warmup_ratio;
    both of a pair may be given, from the file, the command line, or one each."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 2\nwarmup-ratio: 0.1\n", encoding="utf-8")
    args = _parse(["--config", str(cfg), "--max-steps", "5", "--warmup-steps", "1", "--dtype", "fp32"])
    cfg_train = runtime.train_config(args, tmp_path / "o")
    assert (cfg_train.max_steps, cfg_train.epochs, cfg_train.warmup_steps, cfg_train.warmup_ratio) == (5, None, 1, None)


def test_given_is_what_argparse_parsed():
    """`--max-steps=5` counts as given (a spelling argv string matching would miss); a prefix of a
    flag is refused, never read as the flag."""
    given = _parsed(["--max-steps=5", "--lora-r", "4"]).given
    assert {"max_steps", "lora_r"} <= given and "lr" not in given
    with pytest.raises(SystemExit) as e:
        _parse(["--max-step", "5"])
    assert e.value.code == 2


@pytest.mark.parametrize("argv, needle", [
    (["--qlora", "--finetuning", "full"], "--qlora with --finetuning full"),
    (["--full-fraction", "0.3"], "--full-fraction 0.3 applies only"),
    (["--fsdp", "--qlora"], "--fsdp with --qlora"),
    (["--resume", "--overwrite"], "--resume and --overwrite"),
    (["--warmup-steps", "9", "--max-steps", "5"], "--warmup-steps 9 is larger than --max-steps 5"),
])
def test_conflicting_flags(argv, needle):
    with pytest.raises(UsageError, match=needle):
        _parse(argv)


def test_full_then_lora_defaults_to_half_the_steps():
    assert _parse(["--finetuning", "full-then-lora"]).full_fraction == 0.5
    assert _parse(["--finetuning", "full-then-lora", "--full-fraction", "0.25"]).full_fraction == 0.25


def test_help_prints_no_empty_default_and_each_default_once():
    """What --help must never show (that each shown default is the one a run uses is
    tests/examples/test_cli.py::test_help_shows_the_defaults_a_run_uses)."""
    for stage in ("cpt", "sft", "dpo", "kto"):
        p = options.parser(stage, "test")
        text = " ".join(p.format_help().split())   # argparse wraps lines at the terminal width
        assert "(default: None)" not in text and "(default: [])" not in text and "(default: False)" not in text
        assert text.count("--warmup-ratio 0.03") == 1   # stated once, under --warmup-steps


def test_flags_given_in_any_spelling_beat_the_embedded_default(tmp_path):
    """The embedded default fills only what the user did not give: `--max-steps=5`, a --config key,
    and a LLaMA-Factory recipe's own defaults (the recipe's convention) all stay."""
    embedded = options.SFT.embedded
    args, given = _parsed(["--max-steps=5", "--lr", "1e-3"], stage="sft")
    options.apply_embedded(args, given, "sft")
    assert (args.max_steps, args.lr, args.batch_size) == (5, 1e-3, embedded["batch_size"])
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_steps: 7\n", encoding="utf-8")
    args, given = _parsed(["--config", str(cfg)], stage="sft")
    options.apply_embedded(args, given, "sft")
    assert args.max_steps == 7
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stage: sft\nmax_steps: 3\n", encoding="utf-8")
    args, given = _parsed(["--config", str(recipe)], stage="sft")
    options.apply_embedded(args, given, "sft")
    assert (args.max_steps, args.lora_r, args.lora_alpha, args.batch_size, args.lr) == (3, 8, 16.0, 8, 5e-5)
