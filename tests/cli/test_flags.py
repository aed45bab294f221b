"""The flag layer in-process: --config (our names and LLaMA-Factory's), conflicts, --help."""

from __future__ import annotations

import json

import pytest

from cli import flags
from cli.errors import UsageError


def _parse(argv, stage="cpt"):
    p = flags.new_parser(f"{stage}.py", "test")
    flags.add_training_flags(p, stage=stage)
    args = flags.parse_args(p, argv, stage=stage)
    flags.check_training_flags(args)
    return args


def test_config_file_fills_flags_and_command_line_wins(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lora-r: 8\nlr: 3.0e-4\nqlora: true\ndata: [a.txt, b.txt]\nmax_steps: 7\n", encoding="utf-8")
    args = _parse(["--config", str(cfg), "--lr", "1e-3"])
    assert (args.lora_r, args.lr, args.qlora, args.data, args.max_steps) == (8, 1e-3, True, ["a.txt", "b.txt"], 7)
    assert {"lora_r", "lr", "qlora", "data", "max_steps"} <= args._given
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


def test_conflicts_through_config_are_caught(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 2\n", encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        _parse(["--config", str(cfg), "--max-steps", "5"])
    assert e.value.code == 2
    assert "--max-steps: not allowed with argument --epochs" in capsys.readouterr().err


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
    for stage in ("cpt", "sft", "dpo"):
        p = flags.new_parser(f"{stage}.py", "test")
        flags.add_training_flags(p, stage=stage)
        text = p.format_help()
        assert "(default: None)" not in text and "(default: [])" not in text and "(default: False)" not in text
        assert text.count("--warmup-ratio 0.03") == 1   # stated once, under --warmup-steps


