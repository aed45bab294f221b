"""The argparse layer: one-line errors, value types, parsing with provenance.

    p = options.parser("cpt", __doc__)        # the stage's declared options (cli/options.py)
    args, given = parse(p, argv, stage="cpt") # --config values fill what the command line did not give
    "lr" in given                             # set explicitly (command line or --config)

Flags are never abbreviated (`--max-step 5` is an error, not `--max-steps 5`). `--help` prints
each default once, as the script really uses it, and the embedded default's value where it
differs. Under `qwen-tune <stage>` usage and errors name that command.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

from .errors import EXIT_USAGE, UsageError

SEED_MAX = 2**32 - 1   # numpy's (and HF set_seed's) seed range

class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (argparse's default prints the usage block first), no
    abbreviated flags (a prefix would otherwise set a flag the user never named), and the
    embedded default's settings (`embedded`) known to --help."""

    def __init__(self, *a, embedded: Optional[dict] = None, **kw) -> None:
        self.embedded = dict(embedded or {})
        kw.setdefault("allow_abbrev", False)
        super().__init__(*a, **kw)

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)

    def _get_formatter(self):
        formatter = super()._get_formatter()
        formatter.embedded = self.embedded
        return formatter


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" once, only where a real default exists and the text names none,
    and "embedded default: Y" where the embedded default runs with another value."""

    embedded: dict = {}

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        notes = []
        if action.option_strings and action.nargs != 0 and "default" not in text and not (
                default is None or default is False or default is argparse.SUPPRESS or default == []):
            notes.append(f"default: {default}")
        demo = self.embedded.get(action.dest)
        if demo is not None and demo != default and action.nargs != 0:
            notes.append(f"embedded default: {demo:g}" if isinstance(demo, float) else f"embedded default: {demo}")
        return f"{text} ({'; '.join(notes)})" if notes else text


def program_name(script: str) -> str:
    """`qwen-tune sft` when run through the qwen-tune command (which sets argv[0] so), else `script`."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return name if name.startswith("qwen-tune ") else script


def new_parser(prog: str, description: Optional[str], epilog: Optional[str] = None,
               embedded: Optional[dict] = None) -> Parser:
    return Parser(prog=program_name(prog), description=description, epilog=epilog, formatter_class=HelpFormatter,
                  embedded=embedded)


# ---------------------------------------------------------------------- value types
def _number(text: str, kind: type, ok, expected: str):
    """`text` as int/float when ok(value), else an argparse error saying what was expected."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {expected}, got {text}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, lambda v: v > 0, "a positive integer")


def int_at_least(low: int):
    """A type: an int >= `low` (a block of one token has no next token to predict)."""
    def parse(text: str) -> int:
        return _number(text, int, lambda v: v >= low, f"an integer >= {low}")
    parse.__name__ = f"int_at_least_{low}"
    return parse


def seed(text: str) -> int:
    return _number(text, int, lambda v: 0 <= v <= SEED_MAX, f"an integer in [0, {SEED_MAX}]")


def non_negative_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def finite_float(text: str) -> float:
    return _number(text, float, math.isfinite, "a finite number")


def non_negative_float(text: str) -> float:
    return _number(text, float, lambda v: 0.0 <= v < math.inf, "a finite number >= 0")


def positive_float(text: str) -> float:
    return _number(text, float, lambda v: 0.0 < v < math.inf, "a finite number > 0")


def ratio(text: str) -> float:
    value = non_negative_float(text)
    if value >= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def unit_interval(text: str) -> float:
    """(0, 1]: a probability mass such as top-p."""
    value = positive_float(text)
    if value > 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def open_ratio(text: str) -> float:
    value = ratio(text)
    if value == 0.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def shard_size(text: str) -> int:
    """--max-shard-size as bytes ('5GB', '500MB' or a byte count), checked before anything loads."""
    from models.qwen.checkpoint import parse_size

    try:
        size = parse_size(text)
    except ValueError:
        size = 0
    if size <= 0:
        raise argparse.ArgumentTypeError(f"expected a size such as 5GB, 500MB or a byte count > 0, got {text!r}")
    return size


def template_kwargs(text: str) -> dict:
    """--chat-template-kwargs value: a JSON object of chat-template variables."""
    import json

    from data.conversations import template_kwargs_problem

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg} at character {e.pos}): {text[:60]!r}; expected an "
                                         "object such as '{\"enable_thinking\": false}'") from None
    problem = template_kwargs_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(f"{problem}: {text[:60]!r}")
    return value


template_kwargs.takes_mapping = True  # --config gives it as a mapping (cli/config_file.py)


# ---------------------------------------------------------------------- parsing
class Parsed(NamedTuple):
    """What `parse` returns: the flags' values, and which of them the user set.

    args: the namespace of every option (what run.json and a run's identity record).
    given: the dests set explicitly, on the command line in any spelling argparse accepts
    (`--lr 1e-3`, `--lr=1e-3`) or by --config; a default or an embedded-default value is never
    in it. It lives beside the namespace, never in it, so it never reaches run.json.
    """

    args: argparse.Namespace
    given: frozenset[str]


def parse(p: Parser, argv: Optional[Sequence[str]] = None, stage: Optional[str] = None) -> Parsed:
    """Parse flags; values from --config fill in what the command line did not give. `stage`:
    the training stage a LLaMA-Factory recipe's `stage` key must name (None: any).

    `given` is what argparse itself parsed: the same argv parsed once more with every default
    suppressed, so an attribute present then was set by a token, whatever its spelling
    (--max-steps=5, a --config key). The conflict checks and the embedded default's settings use
    it (a default never conflicts, and a flag the user gave always beats the embedded default).
    """
    from .config_file import config_argv

    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    if args.config:
        argv = config_argv(p, args.config, args, explicit_dests(p, argv), stage=stage) + argv
        args = p.parse_args(argv)   # config values pass the same types and choices
    return Parsed(args, frozenset(explicit_dests(p, argv)))


def explicit_dests(p: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The dests `argv` sets: argparse's own parse of it with every default suppressed."""
    saved = [(a, a.default) for a in p._actions]
    saved_defaults, p._defaults = p._defaults, {}
    try:
        for a, _ in saved:
            a.default = argparse.SUPPRESS
        return set(vars(p.parse_args(argv)))
    finally:
        for a, default in saved:
            a.default = default
        p._defaults = saved_defaults


def check_training_flags(args: argparse.Namespace) -> None:
    """Conflicting or out-of-range combinations (argparse checks single values)."""
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    if args.max_steps is not None and args.warmup_steps is not None and args.warmup_steps > args.max_steps:
        raise UsageError(f"--warmup-steps {args.warmup_steps} is larger than --max-steps {args.max_steps}")
    if args.dtype == "fp16" and not _cuda():
        raise UsageError("--dtype fp16 needs a GPU (CPU fp16 kernels are missing or slow): use bf16 or fp32")
    if args.full_fraction is not None and args.finetuning != "full-then-lora":
        raise UsageError(f"--full-fraction {args.full_fraction} applies only to --finetuning full-then-lora")
    if args.qlora and args.finetuning != "lora":
        raise UsageError(f"--qlora with --finetuning {args.finetuning}: the NF4 base has no gradient; "
                         "QLoRA trains adapters only (--finetuning lora)")
    if args.fsdp and args.qlora:
        raise UsageError("--fsdp with --qlora: FSDP2 cannot shard NF4 weights; use DDP (the default) for QLoRA")
    if args.finetuning == "full-then-lora" and args.full_fraction is None:
        from .options import FULL_FRACTION

        args.full_fraction = FULL_FRACTION


def lora_targets(text: str):
    """--lora-targets value -> what lora.inject takes ('all-linear' or a list of names)."""
    if text == "all-linear":
        return text
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise UsageError(f"--lora-targets {text!r}: expected 'all-linear' or module names such as q_proj,v_proj")
    return names


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
