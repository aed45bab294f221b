"""The argparse layer: one-line errors, value types, and the flag groups the stages share.

    p = new_parser("cpt.py", __doc__, embedded=demo_settings.CPT)
    add_training_flags(p, stage="cpt")        # model/data, fine-tuning mode, LoRA, optimisation, ...
    args = parse_args(p, argv)                # --config values fill what the command line did not give
    given(args)                               # the dests set explicitly (command line or --config)

Flags are never abbreviated (`--max-step 5` is an error, not `--max-steps 5`). `--help` prints
each default once, as the script really uses it, and the embedded default's value where it
differs. Under `qwen-tune <stage>` usage and errors name that command.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import paths
from .errors import EXIT_USAGE, UsageError

STAGES = ("cpt", "sft", "dpo")
FINETUNING = ("lora", "full", "full-then-lora")
DTYPES = ("bf16", "fp16", "fp32")
SCHEDULES = ("cosine", "linear", "constant", "constant_with_warmup")
DEFAULT_OUT = {"cpt": paths.CPT_OUT, "sft": paths.SFT_OUT, "dpo": paths.DPO_OUT}
DEFAULT_MODEL = {"cpt": "the embedded demo model", "sft": f"{paths.MERGED_OUT}, merge.py's output",
                 "dpo": f"{paths.SFT_OUT / 'merged'}, sft.py's output"}
SEED_MAX = 2**32 - 1   # numpy's (and HF set_seed's) seed range
# Recommended settings per stage (practitioners' ranges): CPT lr 1e-4 and alpha = r, SFT lr 5e-5
# and alpha = 2r, DPO a low lr; 2 CPT epochs, 1 SFT / DPO epoch.
STAGE_DEFAULTS = {
    "cpt": dict(lr=1e-4, lora_alpha=16.0, epochs=2.0),
    "sft": dict(lr=5e-5, lora_alpha=32.0, epochs=1.0),
    "dpo": dict(lr=5e-6, lora_alpha=32.0, epochs=1.0),
}


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


# ---------------------------------------------------------------------- shared flag groups
def add_training_flags(p: Parser, stage: str) -> None:
    """The flags every training stage shares, with the stage's own defaults."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    d = STAGE_DEFAULTS[stage]
    g = p.add_argument_group("model and data")
    g.add_argument("--model", metavar="DIR", help="HF-format Qwen checkpoint directory (config.json + safetensors) "
                                                  f"(default: {DEFAULT_MODEL[stage]})")
    if stage == "cpt":
        g.add_argument("--data", metavar="PATH", nargs="+",
                       help="text corpus: .txt/.jsonl/.jsonl.gz files or directories")
        g.add_argument("--block-size", type=int_at_least(2), default=2048, help="tokens per packed training block")
    else:
        what = "SFT file(s): messages (with tools), alpaca or ShareGPT" if stage == "sft" else \
            "preference pairs: prompt/messages + chosen + rejected (TRL or LLaMA-Factory format)"
        g.add_argument("--data", metavar="FILE.jsonl", nargs="+", help=what)
        g.add_argument("--eval-data", metavar="FILE.jsonl", help="held-out file (default: a split of --data)")
        g.add_argument("--max-len", type=int_at_least(2), default=1024, help="longest sample in tokens")
    g.add_argument("--eval-fraction", type=ratio, default=0.05,
                   help="fraction of documents/samples held out for evaluation")
    g.add_argument("--out", metavar="DIR", default=str(DEFAULT_OUT[stage]),
                   help="output directory (adapter/, checkpoints/, metrics.jsonl, run.json)")

    g = p.add_argument_group("fine-tuning mode")
    g.add_argument("--finetuning", choices=FINETUNING, default="lora",
                   help="train LoRA adapters, every parameter, or every parameter first and then adapters")
    g.add_argument("--full-fraction", type=open_ratio, default=None,
                   help="with --finetuning full-then-lora: the fraction of the steps trained in full (default: 0.5)")
    g.add_argument("--qlora", action="store_true", help="quantise the frozen base to NF4 (QLoRA; LoRA only)")
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard parameters, gradients and optimizer state with FSDP2 (default: DDP)")

    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-r", type=positive_int, default=16, help="LoRA rank")
    g.add_argument("--lora-alpha", type=non_negative_float, default=d["lora_alpha"], help="LoRA alpha (scale = alpha/r)")
    g.add_argument("--lora-dropout", type=ratio, default=0.05, help="dropout on the LoRA input")
    g.add_argument("--lora-targets", default="all-linear",
                   help="'all-linear' or comma-separated module names (q_proj,k_proj,...)")
    g.add_argument("--use-rslora", action="store_true", help="rank-stabilised scale alpha/sqrt(r) (rsLoRA)")
    g.add_argument("--use-dora", action="store_true", help="weight-decomposed adapters (DoRA)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=positive_float, default=d["lr"], help="peak learning rate")
    # Both of a pair may be given (a LLaMA-Factory recipe often does): as in HF's Trainer, the
    # step count wins.
    g.add_argument("--warmup-steps", type=non_negative_int, default=None,
                   help="linear warm-up steps from lr 0, as HF's schedules; wins over --warmup-ratio "
                        "(default: --warmup-ratio 0.03)")
    g.add_argument("--warmup-ratio", type=ratio, default=None, help="linear warm-up as a fraction of all steps")
    g.add_argument("--epochs", type=positive_float, default=None, help=f"passes over the data (default: {d['epochs']:g})")
    g.add_argument("--max-steps", type=positive_int, default=None,
                   help="optimizer steps; wins over --epochs when both are given, as HF's max_steps")
    g.add_argument("--lr-scheduler", choices=SCHEDULES, default="cosine",
                   help="after the warm-up: cosine or linear decay to 0, or constant")
    g.add_argument("--batch-size", type=positive_int, default=1, help="micro-batch per process")
    g.add_argument("--grad-accum", type=positive_int, default=16, help="micro-batches per optimizer step")
    g.add_argument("--max-grad-norm", type=non_negative_float, default=1.0, help="gradient clipping (0: off)")
    g.add_argument("--weight-decay", type=non_negative_float, default=0.0, help="decoupled weight decay")
    g.add_argument("--dtype", choices=DTYPES, default=None,
                   help="compute dtype (default: bf16 on a GPU, fp32 on a CPU, where bf16 matmuls are slower)")
    g.add_argument("--no-grad-checkpointing", action="store_true", help="keep activations instead of recomputing")
    g.add_argument("--seed", type=seed, default=0, help="seed of initialisation, dropout and data order")

    g = p.add_argument_group("evaluation, checkpoints and logging")
    g.add_argument("--eval-every", type=positive_int, default=None, help="evaluate every N steps (default: at the end)")
    g.add_argument("--save-every", type=positive_int, default=None, help="checkpoint every N steps (default: at the end)")
    g.add_argument("--keep-last", type=positive_int, default=2, help="checkpoints kept (plus the best by eval loss)")
    g.add_argument("--log-every", type=positive_int, default=None,
                   help="without a terminal: a progress line every N steps (default: about 20 lines per run)")
    g.add_argument("--report-to", choices=("none", "tensorboard"), default="none",
                   help="also write TensorBoard event files under --out/runs (metrics.jsonl is always written)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    g.add_argument("--overwrite", action="store_true",
                   help="delete the earlier run in --out (only a folder these scripts wrote) and start over")
    add_config_flag(p)


def add_chat_output_flags(p: Parser, sample_questions: int) -> None:
    """What a chat stage (sft.py, dpo.py) writes besides the adapter, the held-out answers it
    shows before and after training, and the chat-template variables it renders with."""
    p.add_argument("--no-merge", action="store_true", help="write only adapter/, not merged/")
    p.add_argument("--sample-questions", type=non_negative_int, default=sample_questions,
                   help="held-out questions answered before/after")
    p.add_argument("--sample-tokens", type=positive_int, default=48, help="tokens per sample answer")
    add_chat_template_flag(p)


def add_chat_template_flag(p: Parser) -> None:
    """--chat-template-kwargs: variables for the chat template, for every chat this run renders."""
    p.add_argument("--chat-template-kwargs", metavar="JSON", type=template_kwargs, default=None,
                   help="chat-template variables as a JSON object, e.g. '{\"enable_thinking\": false}' or "
                        "'{\"preserve_thinking\": true}' (a record's own \"chat_template_kwargs\" win)")


def add_config_flag(p: Parser) -> None:
    p.add_argument("--config", metavar="FILE",
                   help="YAML or JSON file of flag values (our flag names, e.g. lora-r or lora_r, or "
                        "LLaMA-Factory's keys: what such a recipe leaves out takes LLaMA-Factory's / HF's "
                        "defaults, e.g. lora_rank 8, lora_alpha 2 x rank, lr 5e-5 linear, seed 42); flags on "
                        "the command line win")


def add_overwrite_flag(p: Parser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace an --out these scripts wrote earlier (never a folder they did not write)")


# ---------------------------------------------------------------------- parsing
class Args(argparse.Namespace):
    """The parsed flags; which of them were given explicitly is kept outside vars(args) (so it
    never reaches run.json or a run's identity): read it with `given(args)`."""

    __slots__ = ("_given_dests",)


def given(args: argparse.Namespace) -> frozenset[str]:
    """The dests set explicitly, on the command line (in any spelling argparse accepted) or by
    --config; empty for a namespace that `parse_args` did not make."""
    return getattr(args, "_given_dests", frozenset())


def parse_args(p: Parser, argv: Optional[Sequence[str]] = None, stage: Optional[str] = None) -> Args:
    """Parse flags; values from --config fill in what the command line did not give.

    `given(args)` is what argparse itself parsed: the same argv parsed once more with every
    default suppressed, so an attribute present then was set by a token, whatever its spelling
    (--max-steps=5, a --config key). The conflict checks and the embedded default's settings use
    it (a default never conflicts, and a flag the user gave always beats the embedded default).
    """
    from .config_file import config_argv

    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv, namespace=Args())
    if args.config:
        argv = config_argv(p, args.config, args, explicit_dests(p, argv), stage=stage) + argv
        args = p.parse_args(argv, namespace=Args())   # config values pass the same types and choices
    args._given_dests = frozenset(explicit_dests(p, argv))
    return args


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
        args.full_fraction = 0.5


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
