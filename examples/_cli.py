"""The command-line layer shared by the example scripts: flags, --config files, input checks.

Every script follows one rule for bad input (DESIGN.md section 3): a one-line message on
stderr that names the flag, file, line or key, and exit code 2 — never a traceback, and
nothing already written is touched. `run_main(main)` enforces it around a script's main().
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

# Default locations of the two-stage pipeline's outputs (relative to the working directory),
# so that merge.py, sft.py and generate.py find cpt.py's outputs with no flags.
RUNS = Path("runs")
DEFAULT_CPT_OUT = RUNS / "cpt"
DEFAULT_MERGED_OUT = RUNS / "cpt-merged"
DEFAULT_SFT_OUT = RUNS / "sft"
RUN_FILE = "run.json"  # the identity of the run that owns an output directory


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


# ---------------------------------------------------------------------- parser
class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (argparse's default prints the usage block first)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def new_parser(prog: str, description: str) -> Parser:
    return Parser(prog=prog, description=description, formatter_class=_HelpFormatter)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not value >= 0.0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def ratio(text: str) -> float:
    value = non_negative_float(text)
    if value >= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def add_training_flags(p: Parser, *, sft: bool) -> None:
    """The flags cpt.py and sft.py share (DESIGN.md section 3), with stage-specific defaults."""
    g = p.add_argument_group("model and data")
    g.add_argument("--model", metavar="DIR", help="HF-format Qwen checkpoint directory (config.json + safetensors)")
    if sft:
        g.add_argument("--data", metavar="FILE.jsonl", nargs="+",
                       help="SFT file(s): alpaca (instruction/input/output) or messages format")
        g.add_argument("--eval-data", metavar="FILE.jsonl", help="held-out SFT file (default: a split of --data)")
        g.add_argument("--max-len", type=positive_int, default=1024, help="longest sample in tokens")
    else:
        g.add_argument("--data", metavar="PATH", nargs="+",
                       help="text corpus: .txt/.jsonl/.jsonl.gz files or directories")
        g.add_argument("--block-size", type=positive_int, default=2048, help="tokens per packed training block")
    g.add_argument("--eval-fraction", type=ratio, default=0.05,
                   help="fraction of documents/samples held out for evaluation")
    g.add_argument("--out", metavar="DIR", help="output directory (adapter/, checkpoints/, metrics.jsonl)")
    g.add_argument("--qlora", action="store_true", help="quantise the frozen base to NF4 (QLoRA)")

    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-r", type=positive_int, default=16, help="LoRA rank")
    g.add_argument("--lora-alpha", type=non_negative_float, default=32.0 if sft else 16.0, help="LoRA alpha (scale = alpha/r)")
    g.add_argument("--lora-dropout", type=ratio, default=0.05, help="dropout on the LoRA input")
    g.add_argument("--lora-targets", default="all-linear",
                   help="'all-linear' or comma-separated module names (q_proj,k_proj,...)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=non_negative_float, default=5e-5 if sft else 1e-4, help="peak learning rate")
    w = g.add_mutually_exclusive_group()
    w.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps (default: ratio 0.03)")
    w.add_argument("--warmup-ratio", type=ratio, default=None, help="linear warm-up as a fraction of all steps")
    g.add_argument("--epochs", type=non_negative_float, default=None,
                   help=f"passes over the data (default {1 if sft else 2}); excludes --max-steps")
    g.add_argument("--max-steps", type=positive_int, default=None, help="optimizer steps; excludes --epochs")
    g.add_argument("--batch-size", type=positive_int, default=1, help="micro-batch per process")
    g.add_argument("--grad-accum", type=positive_int, default=16, help="micro-batches per optimizer step")
    g.add_argument("--max-grad-norm", type=non_negative_float, default=1.0, help="gradient clipping (0: off)")
    g.add_argument("--weight-decay", type=non_negative_float, default=0.0, help="decoupled weight decay")
    g.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="compute dtype (default bf16; fp32 when no GPU, where CPU bf16 matmuls are slower)")
    g.add_argument("--no-grad-checkpointing", action="store_true", help="keep activations instead of recomputing")
    g.add_argument("--seed", type=int, default=0, help="seed of initialisation, dropout and data order")

    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-every", type=positive_int, default=None, help="evaluate every N steps (default: at the end)")
    g.add_argument("--save-every", type=positive_int, default=None, help="checkpoint every N steps (default: at the end)")
    g.add_argument("--keep-last", type=positive_int, default=2, help="checkpoints kept (plus the best by eval loss)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    g.add_argument("--overwrite", action="store_true", help="delete the run already in --out and start over")
    add_config_flag(p)


def add_config_flag(p: Parser) -> None:
    p.add_argument("--config", metavar="FILE",
                   help="YAML or JSON file of flag values (keys = flag names, e.g. lora-r or lora_r); "
                        "flags on the command line win")


# ---------------------------------------------------------------------- parsing + --config
def parse_args(p: Parser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse flags; values from --config fill in what the command line did not give.

    The namespace gets `_given`: the set of dests set explicitly (command line or config),
    which the conflict checks use (a default never conflicts).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    given = _explicit_dests(p, argv)
    if args.config:
        values = load_config_file(args.config)
        actions = {a.dest: a for a in p._actions if a.dest not in ("help", "config")}
        cli_argv: list[str] = []
        for key, value in values.items():
            dest = str(key).lstrip("-").replace("-", "_")
            if dest not in actions:
                raise UsageError(f"{args.config}: unknown key {key!r} (expected flag names such as "
                                 f"{', '.join(sorted(a.replace('_', '-') for a in list(actions)[:6]))}, ...)")
            if dest in given:
                continue  # the command line wins
            cli_argv += _as_argv(actions[dest], value, args.config, key)
        # Re-parse so config values go through the same types, choices and exclusions.
        try:
            merged = p.parse_args(cli_argv + argv)
        except SystemExit:
            raise
        given |= set(_explicit_dests(p, cli_argv))
        args = merged
    args._given = given
    return args


def _explicit_dests(p: Parser, argv: Sequence[str]) -> set[str]:
    flags = {}
    for a in p._actions:
        for opt in a.option_strings:
            flags[opt] = a.dest
    out = set()
    for tok in argv:
        name = tok.split("=", 1)[0]
        if name in flags:
            out.add(flags[name])
    return out


def _as_argv(action: argparse.Action, value: Any, file: str, key: str) -> list[str]:
    flag = max(action.option_strings, key=len)
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise UsageError(f"{file}: key {key!r}: expected true or false, got {value!r}")
        want = isinstance(action, argparse._StoreTrueAction)
        return [flag] if value == want else []
    if value is None:
        return []
    if action.nargs in ("+", "*"):
        items = value if isinstance(value, list) else [value]
        if not items:
            raise UsageError(f"{file}: key {key!r}: expected at least one value")
        return [flag] + [str(v) for v in items]
    if isinstance(value, (list, dict)):
        raise UsageError(f"{file}: key {key!r}: expected a single value, got {type(value).__name__}")
    return [flag, str(value)]


def load_config_file(path: str) -> dict:
    """A YAML (.yaml/.yml) or JSON file holding one mapping of flag -> value."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--config {path}: file not found")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"--config {path}: not UTF-8 text (byte {e.start})") from None
    if file.suffix.lower() == ".json":
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"--config {path}: line {e.lineno}: invalid JSON ({e.msg})") from None
    else:
        import yaml

        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"line {mark.line + 1}: " if mark is not None else ""
            raise UsageError(f"--config {path}: {where}invalid YAML ({getattr(e, 'problem', e)})") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise UsageError(f"--config {path}: expected a mapping of flag names to values, got {type(values).__name__}")
    return values


# ---------------------------------------------------------------------- input checks
def check_training_flags(args: argparse.Namespace) -> None:
    """Conflicting or out-of-range combinations (argparse checks single values)."""
    if args.epochs is not None and args.max_steps is not None:
        raise UsageError("--epochs and --max-steps exclude each other: give one")
    if args.warmup_steps is not None and args.warmup_ratio is not None:
        raise UsageError("--warmup-steps and --warmup-ratio exclude each other: give one")
    if args.warmup_steps is not None and args.warmup_steps < 0:
        raise UsageError(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    if args.epochs is not None and args.epochs <= 0:
        raise UsageError(f"--epochs must be > 0, got {args.epochs}")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    if args.max_steps is not None and args.warmup_steps is not None and args.warmup_steps > args.max_steps:
        raise UsageError(f"--warmup-steps {args.warmup_steps} is larger than --max-steps {args.max_steps}")
    if args.dtype == "fp16" and not _cuda():
        raise UsageError("--dtype fp16 needs a GPU (CPU fp16 kernels are missing or slow): use bf16 or fp32")
    if args.qlora and args.dtype == "fp32":
        pass  # allowed: NF4 weights with fp32 compute (slow, but valid)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def check_model_dir(path: Optional[str], flag: str = "--model") -> Path:
    """An HF-format Qwen checkpoint directory: config.json of a Qwen model plus weights."""
    if not path:
        raise UsageError(f"{flag}: no model directory given")
    root = Path(path)
    if not root.exists():
        raise UsageError(f"{flag} {path}: directory not found")
    if not root.is_dir():
        raise UsageError(f"{flag} {path}: not a directory (expected an HF-format Qwen checkpoint directory)")
    if not (root / "config.json").is_file():
        if (root / "adapter_config.json").is_file():
            raise UsageError(f"{flag} {path}: holds a LoRA adapter, not a model (pass it as --adapter)")
        raise UsageError(f"{flag} {path}: not a Qwen checkpoint (no config.json)")
    from models.qwen import ConfigError, QwenConfig

    try:
        QwenConfig.from_hf(root)
    except ConfigError as e:
        raise UsageError(f"{flag} {path}: not a Qwen checkpoint: {_strip_path(str(e), root)}") from None
    if not any(root.glob("*.safetensors")) and not any(root.glob("*.bin")):
        raise UsageError(f"{flag} {path}: no weights (*.safetensors) in the directory")
    return root


def check_adapter_dir(path: str, flag: str = "--adapter") -> Path:
    root = Path(path)
    if not root.is_dir():
        raise UsageError(f"{flag} {path}: directory not found")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (root / name).is_file():
            raise UsageError(f"{flag} {path}: not a PEFT adapter (no {name})")
    try:
        json.loads((root / "adapter_config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{flag} {path}: adapter_config.json is not valid JSON ({e})") from None
    return root


def check_data_paths(paths: Iterable[str], flag: str = "--data") -> list[Path]:
    out = []
    for path in paths:
        p = Path(path)
        if not p.exists():
            raise UsageError(f"{flag} {path}: no such file or directory")
        if p.is_dir() and not any(x.is_file() for x in p.rglob("*")):
            raise UsageError(f"{flag} {path}: directory holds no files")
        if p.is_file() and p.stat().st_size == 0:
            raise UsageError(f"{flag} {path}: file is empty")
        out.append(p)
    return out


def _strip_path(message: str, root: Path) -> str:
    return message.replace(str(root / "config.json") + ": ", "config.json: ")


# ---------------------------------------------------------------------- output dirs
# The split of the global batch may change on --resume (e.g. another number of processes
# under torchrun), its size may not: the identity holds "global_batch" = batch-size x
# grad-accum x processes instead of the two flags.
BATCH_SPLIT_FLAGS = ("batch_size", "grad_accum")
IDENTITY_IGNORED = {
    "out", "resume", "overwrite", "config", "eval_every", "save_every", "keep_last", "_given", *BATCH_SPLIT_FLAGS,
}


def run_identity(args: argparse.Namespace, extra: Optional[dict] = None) -> dict:
    """The settings that make a run what it is (what --resume must match)."""
    ident = {k: v for k, v in sorted(vars(args).items()) if k not in IDENTITY_IGNORED}
    if all(hasattr(args, k) for k in BATCH_SPLIT_FLAGS):
        from train import distributed

        ident["global_batch"] = args.batch_size * args.grad_accum * distributed.world_size()
    ident.update(extra or {})
    return json.loads(json.dumps(ident, default=str))


def prepare_out_dir(out: Path, identity: dict, *, resume: bool, overwrite: bool, flag: str = "--out") -> None:
    """Check `out` may take this run; never touches a directory that belongs to another run.

    empty or missing: fine. Holds this run: needs --resume (continue) or --overwrite.
    Holds a different run, or files that are not a run: exit 2 unless --overwrite (only a
    directory that holds a run is ever deleted).
    Under torchrun every rank checks the same directory; rank 0 alone deletes it.
    """
    from train import distributed

    distributed.barrier()   # every rank looks at `out` before any of them changes it
    if resume and not (out / RUN_FILE).is_file():
        if out.exists() and any(out.iterdir()):
            raise UsageError(f"--resume: {out} holds no run to resume (no {RUN_FILE})")
        raise UsageError(f"--resume: {out} holds no run to resume")
    if not out.exists():
        return
    if not out.is_dir():
        raise UsageError(f"{flag} {out}: exists and is not a directory")
    if not any(out.iterdir()):
        return
    run_file = out / RUN_FILE
    if not run_file.is_file():
        raise UsageError(f"{flag} {out}: exists, is not empty and holds no run of these scripts; "
                         f"choose another {flag}")
    try:
        previous = json.loads(run_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UsageError(f"{flag} {out}: {RUN_FILE} is corrupt; choose another {flag}") from None
    diff = _first_difference(previous, identity)
    if overwrite:
        if distributed.is_main():
            shutil.rmtree(out)
        distributed.barrier()
        return
    if diff is not None:
        key, old, new = diff
        what = ("the global batch (--batch-size x --grad-accum x processes)" if key == "global_batch"
                else f"--{key.replace('_', '-')}")
        raise UsageError(f"{flag} {out}: holds a different run ({what} was {old!r}, now "
                         f"{new!r}); choose another {flag} or pass --overwrite")
    if not resume:
        raise UsageError(f"{flag} {out}: already holds this run; pass --resume to continue it, "
                         f"or --overwrite to start over")


def _first_difference(old: dict, new: dict):
    if "global_batch" not in old and all(k in old for k in BATCH_SPLIT_FLAGS):   # run.json of one process
        old = {**old, "global_batch": old["batch_size"] * old["grad_accum"]}
    for key in sorted(set(old) | set(new)):
        if key in IDENTITY_IGNORED:
            continue
        if old.get(key) != new.get(key):
            return key, old.get(key), new.get(key)
    return None


def write_run_file(out: Path, identity: dict) -> None:
    from train import distributed

    if not distributed.is_main():   # torchrun: rank 0 writes the run's files
        return
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{RUN_FILE}.tmp"
    tmp.write_text(json.dumps(identity, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, out / RUN_FILE)


# ---------------------------------------------------------------------- error boundary
def _expected_errors() -> tuple[type, ...]:
    """Library exceptions that mean bad input (reported in one line, exit 2)."""
    errors: list[type] = [UsageError, FileNotFoundError, IsADirectoryError, NotADirectoryError, UnicodeDecodeError]
    try:
        from models.qwen import CheckpointError, ConfigError

        errors += [CheckpointError, ConfigError]
    except ImportError:
        pass
    for module, names in (("data.errors", ("DataError",)), ("lora", ("AdapterError",)),
                          ("train", ("CheckpointError", "ConfigError")), ("models.qwen.tokenizer", ("TokenizerError",))):
        try:
            mod = importlib.import_module(module)
        except Exception:
            continue
        for name in names:
            cls = getattr(mod, name, None)
            if isinstance(cls, type) and issubclass(cls, BaseException):
                errors.append(cls)
    return tuple(errors)


def start_distributed() -> bool:
    """Under torchrun (WORLD_SIZE > 1): join the process group; only rank 0 prints on stdout."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    from train import distributed

    distributed.init_from_env()
    if not distributed.is_main():
        sys.stdout = open(os.devnull, "w", encoding="utf-8")
    return True


def run_main(main: Callable[[], Optional[int]]) -> None:
    """Call main(); bad input -> one line on stderr + exit 2; Ctrl-C -> exit 130.

    Under torchrun every process runs main() (see `start_distributed`)."""
    prog = Path(sys.argv[0]).name
    distributed = start_distributed()
    try:
        code = main()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130)
    except _expected_errors() as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)
    if distributed:
        from train.distributed import shutdown

        shutdown()
    raise SystemExit(code or 0)
