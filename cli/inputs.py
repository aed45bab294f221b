"""Checks of the inputs a script names, made before anything loads or is written: a missing
model, an adapter given as --model, an empty data file all end in one line naming the flag."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from fileio.safe_load import read_json

from .errors import UsageError


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
        message = str(e).replace(str(root / "config.json") + ": ", "config.json: ")
        raise UsageError(f"{flag} {path}: not a Qwen checkpoint: {message}") from None
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
        read_json(root / "adapter_config.json", UsageError, dict)
    except UsageError as e:
        raise UsageError(f"{flag} {path}: {e}") from None
    return root


def check_data_paths(paths: Iterable[str], flag: str = "--data", files_only: bool = False) -> list[Path]:
    out = []
    for path in paths:
        p = Path(path)
        if not p.exists():
            raise UsageError(f"{flag} {path}: no such file or directory")
        if p.is_dir() and files_only:
            raise UsageError(f"{flag} {path}: is a directory; expected one or more .jsonl files")
        if p.is_dir() and not any(x.is_file() for x in p.rglob("*")):
            raise UsageError(f"{flag} {path}: directory holds no files")
        if p.is_file() and p.stat().st_size == 0:
            raise UsageError(f"{flag} {path}: file is empty")
        out.append(p)
    return out


def check_lora_targets(model_dir: Path, targets, flag: str = "--lora-targets") -> None:
    """The targets must name linears of this model: checked on the model's shape alone (built on
    the meta device, no weights read), so a typo costs seconds, not a 7B load."""
    import torch

    import lora
    from models.qwen import CheckpointError, Qwen
    from models.qwen.checkpoint import checked_config

    try:
        config = checked_config(model_dir)   # layer and expert counts checked on the weights' headers
    except CheckpointError:
        return   # unreadable weights: the load names them, after the data has been checked
    with torch.device("meta"):
        shape = Qwen(config)
    try:
        lora.resolve_targets(shape, targets)
    except ValueError as e:
        raise UsageError(f"{flag} {targets if isinstance(targets, str) else ','.join(targets)}: {e}") from None


def check_block_size(model_dir: Path, block: int, flag: str = "--block-size") -> Optional[str]:
    """A note when `block` exceeds the model's max_position_embeddings (it trains, but on
    positions the model never saw), else None."""
    from models.qwen import QwenConfig

    limit = QwenConfig.from_hf(model_dir).max_position_embeddings
    if block > limit:
        return (f"{flag} {block} is above the model's max_position_embeddings {limit}: positions past "
                f"{limit} were never trained (use a smaller {flag} or a model with a longer context)")
    return None


def model_dir_or_default(given: Optional[str], default: Path, made_by: str) -> Path:
    """--model DIR, or the previous stage's output `default` when not given (`made_by` names the
    script(s) that write it, for the error when it is missing)."""
    if given is not None:
        return check_model_dir(given)
    if not default.is_dir():
        raise UsageError(f"--model: not given and {default} does not exist; run {made_by} first, or pass --model DIR")
    return check_model_dir(str(default), flag=f"--model (default {default})")


def jsonl_data(args) -> tuple[list[Path], Optional[Path]]:
    """(--data files, --eval-data file or None) of a stage that reads .jsonl records."""
    data = check_data_paths(args.data, files_only=True)
    held_out = check_data_paths([args.eval_data], flag="--eval-data")[0] if args.eval_data else None
    return data, held_out


@dataclass
class PairInputs:
    """What a stage trained on preference pairs (dpo, kto, reward) starts from."""

    model_dir: Path
    data_paths: list[Path]
    eval_path: Optional[Path]
    demo_questions: Optional[Path]   # the demo's held-out SFT questions (None with --data)
    changed: list[str]               # the embedded-default settings applied (the model is the demo's shape)


def pair_inputs(args, given, stage: str) -> PairInputs:
    """--model (default: sft.py's merged output) and --data (default: pairs derived from the demo's
    SFT set; for kto its unpaired rows, demo.corpus.kto_rows), checked; the embedded default's settings applied when the model has the demo's shape."""
    from demo.base_model import is_demo_shape

    from . import options, paths

    model_dir = model_dir_or_default(args.model, paths.SFT_OUT / "merged", "examples/sft.py")
    demo_questions = None
    if args.data:
        data_paths, eval_path = jsonl_data(args)
    else:
        from demo import corpus as demo_corpus

        corpus = demo_corpus.build()
        # KTO: unpaired rows (real answers and their degenerate loops); the others: pairs
        train_rows, eval_path = (demo_corpus.kto_rows(corpus) if stage == "kto"
                                 else demo_corpus.preference_pairs(corpus, seed=0))
        data_paths, demo_questions = [train_rows], corpus.sft_eval
    changed = options.apply_embedded(args, given, stage) if is_demo_shape(model_dir) else []
    return PairInputs(model_dir, data_paths, eval_path, demo_questions, changed)


def check_max_prompt_len(args, scored: str) -> None:
    """--max-prompt-len must leave room in --max-len for `scored` ("the answers need")."""
    if args.max_prompt_len is not None and args.max_prompt_len >= args.max_len:
        raise UsageError(f"--max-prompt-len {args.max_prompt_len}: must be in [1, --max-len {args.max_len}) "
                         f"({scored} at least one token)")
