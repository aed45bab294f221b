"""--config FILE: flag values from YAML or JSON, in our names or in LLaMA-Factory's.

Our names are the flags without dashes (`lora-r: 16` or `lora_r: 16`). A LLaMA-Factory recipe
(`llamafactory-cli train qwen_lora_sft.yaml`, recognised by its keys) runs unchanged: its keys
are translated below, and every key is either honoured or named in one line on stderr (an
unknown key in a file of our own names is an error: it is a typo). A bad value names the
file and its key, not the flag it became.

A recipe's settings take the defaults of the convention it comes from, as `llamafactory-cli`
would run it: what the recipe leaves out is LLaMA-Factory 0.9.5's / HF TrainingArguments'
default (`LF_DEFAULTS`: lora_rank 8, lora_alpha twice the rank, lora_dropout 0, lora_target
all, learning_rate 5e-5, lr_scheduler_type linear, no warm-up, weight_decay 0, max_grad_norm
1.0, num_train_epochs 3, per_device_train_batch_size 8, gradient_accumulation_steps 1, seed
42, logging_steps and save_steps 500, cutoff_len 2048, val_size 0), not this script's. Flags
on the command line still win. As in HF's Trainer, max_steps > 0 wins over num_train_epochs
and warmup_steps > 0 over warmup_ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from fileio.safe_load import loads_json, loads_yaml, read_json

from .errors import UsageError

# LLaMA-Factory's `stage` -> the script that runs it.
LF_STAGES = {"pt": "cpt", "sft": "sft", "dpo": "dpo"}
# Keys that change nothing here (we always use SDPA, never remote code, ...).
LF_HARMLESS = {
    "do_train", "do_eval", "flash_attn", "trust_remote_code", "preprocessing_num_workers",
    "dataloader_num_workers", "overwrite_cache", "plot_loss", "ddp_timeout", "per_device_eval_batch_size",
    "eval_strategy", "evaluation_strategy", "save_strategy", "logging_dir", "disable_tqdm",
    "double_quantization", "save_only_model", "bf16_full_eval",
    "ddp_find_unused_parameters", "upcast_layernorm",
    "run_name", "logging_first_step", "save_safetensors",
}
# HF `optim` names that are the AdamW this library runs (fp32 states, decoupled weight decay).
ADAMW_OPTIMS = {"adamw_torch", "adamw_torch_fused", "adamw_hf"}
# What a LLaMA-Factory recipe runs with where it sets nothing (LLaMA-Factory 0.9.5's
# hparams and HF TrainingArguments' defaults), as our dests; lora_alpha is 2 x the rank.
LF_DEFAULTS = {
    "lora_r": 8, "lora_dropout": 0.0, "lora_targets": "all-linear", "lr": 5e-5, "lr_scheduler": "linear",
    "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0, "epochs": 3.0, "batch_size": 8, "grad_accum": 1,
    "seed": 42, "log_every": 500, "save_every": 500, "max_len": 2048, "block_size": 2048, "eval_fraction": 0.0,
}
# A default left out when the recipe sets the other of its pair (warmup_steps would win over it).
LF_RIVALS = {"warmup_steps": "warmup_ratio", "epochs": "max_steps"}
# Chat templates of LLaMA-Factory that mean "Qwen's ChatML": we render the model's own template.
LF_QWEN_TEMPLATES = {"qwen", "qwen3", "qwen3_nothink", "qwen2_vl", "default", "empty", "chatml"}


def load_config_file(path: str) -> dict:
    """A YAML (.yaml/.yml) or JSON file holding one mapping of keys to values."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--config {path}: file not found")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"--config {path}: not UTF-8 text (byte {e.start})") from None
    if file.suffix.lower() == ".json":
        try:
            values = loads_json(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"--config {path}: line {e.lineno}: invalid JSON ({e.msg})") from None
    else:
        import yaml

        try:
            values = loads_yaml(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"line {mark.line + 1}: " if mark is not None else ""
            raise UsageError(f"--config {path}: {where}invalid YAML ({getattr(e, 'problem', e)})") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise UsageError(f"--config {path}: expected a mapping of keys to values, got {type(values).__name__}")
    for key, value in values.items():
        if not isinstance(key, str):
            raise UsageError(f"--config {path}: key {key!r} is a {type(key).__name__}, expected a name")
        if isinstance(value, list) and any(isinstance(v, (list, dict)) for v in value):
            raise UsageError(f"--config {path}: key {key!r}: a list holding lists or mappings "
                             f"(expected a value or a list of values)")
    return values


def config_argv(p: argparse.ArgumentParser, path: str, args: argparse.Namespace, given: set[str],
                stage: Optional[str] = None) -> list[str]:
    """The command-line tokens the file stands for; `given` are the dests the command line set
    (`args` their values), which the file does not override."""
    values = load_config_file(path)
    actions = {a.dest: a for a in p._actions if a.dest not in ("help", "config")}
    if is_llama_factory(values, actions):
        settings, ignored = _llama_factory_settings(values, actions, path, stage, args, given)
    else:
        settings, ignored = _our_settings(values, actions, path), []
    settings = _command_line_wins(p, settings, given, path)
    argv: list[str] = []
    for dest, (key, value) in settings.items():
        argv += _as_argv(actions[dest], value, path, key)
    if ignored:
        print(f"{Path(sys.argv[0]).name}: --config {path}: not honoured here (ignored): {'; '.join(ignored)}",
              file=sys.stderr, flush=True)
    return argv


def is_llama_factory(values: dict, actions: dict) -> bool:
    """A recipe of LLaMA-Factory's: it has a key of theirs that is not one of our flag names."""
    return any(str(k) in LF_KEYS or str(k) in LF_HARMLESS for k in values if _dest(k) not in actions)


def _dest(key: Any) -> str:
    return str(key).lstrip("-").replace("-", "_")


def _our_settings(values: dict, actions: dict, path: str) -> dict[str, tuple[str, Any]]:
    settings = {}
    for key, value in values.items():
        if _dest(key) not in actions:
            names = ", ".join(sorted(a.replace("_", "-") for a in actions)[:8])
            raise UsageError(f"--config {path}: unknown key {key!r} (expected flag names such as {names}, ...)")
        settings[_dest(key)] = (str(key), value)
    return settings


def _llama_factory_settings(values: dict, actions: dict, path: str, stage: Optional[str], args, given: set[str]):
    """(dest -> (file key, value), the keys not honoured) of a LLaMA-Factory recipe: its keys
    translated (a key also spelled as one of our flags is read as LLaMA-Factory's), our own
    flag names in it winning over translations, and LF_DEFAULTS where the recipe is silent."""
    settings: dict[str, tuple[str, Any]] = {}
    ours: dict[str, tuple[str, Any]] = {}
    ignored: list[str] = []
    for key, value in values.items():
        key = str(key)
        if key in LF_KEYS:
            for dest, value2 in _translated(key, value, values, path, stage):
                if dest is None:
                    ignored.append(f"{key}: {value2}")
                elif dest in actions:
                    settings[dest] = (key, value2)
                else:
                    ignored.append(f"{key} (this script has no --{dest.replace('_', '-')})")
        elif _dest(key) in actions:
            ours[_dest(key)] = (key, value)
        elif key not in LF_HARMLESS:
            ignored.append(key)
    settings.update(ours)
    for dest, value in LF_DEFAULTS.items():
        rival = LF_RIVALS.get(dest)
        if rival in settings or rival in given:
            continue   # the recipe set the other of the pair (which the default would override)
        if dest in actions and dest not in settings and dest not in given:
            settings[dest] = (f"LLaMA-Factory's default for {dest}", value)
    if "lora_alpha" in actions and "lora_alpha" not in settings and "lora_alpha" not in given:
        rank = args.lora_r if "lora_r" in given else settings["lora_r"][1]
        settings["lora_alpha"] = ("LLaMA-Factory's default lora_alpha (2 x lora_rank)", 2 * _number(rank))
    return settings, ignored


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return value   # _as_argv names the key whose value is not a number


def _command_line_wins(p: argparse.ArgumentParser, settings: dict, given: set[str], path: str) -> dict:
    """The file's settings less what the command line gave, also within a mutually exclusive
    group (the command line's member wins); two members set by the file are named."""
    out = {dest: kv for dest, kv in settings.items() if dest not in given}
    for group in getattr(p, "_mutually_exclusive_groups", []):
        members = [a.dest for a in group._group_actions]
        if any(m in given for m in members):
            out = {d: kv for d, kv in out.items() if d not in members}
        from_file = [out[m][0] for m in members if m in out]
        if len(from_file) > 1:
            raise UsageError(f"--config {path}: keys {' and '.join(map(repr, from_file))} exclude each other")
    return out


def _as_argv(action: argparse.Action, value: Any, file: str, key: str) -> list[str]:
    flag = max(action.option_strings, key=len)
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise UsageError(f"--config {file}: key {key!r}: expected true or false, got {value!r}")
        want = isinstance(action, argparse._StoreTrueAction)
        return [flag] if value == want else []
    if value is None:
        return []
    if action.nargs in ("+", "*"):
        items = value if isinstance(value, list) else [value]
        if not items:
            raise UsageError(f"--config {file}: key {key!r}: expected at least one value")
        return [flag] + [_checked(action, v, file, key) for v in items]
    if isinstance(value, dict) and getattr(action.type, "takes_mapping", False):
        return [flag, _checked(action, json.dumps(value), file, key)]
    if isinstance(value, (list, dict)):
        raise UsageError(f"--config {file}: key {key!r}: expected a single value, got {type(value).__name__}")
    return [flag, _checked(action, value, file, key)]


def _checked(action: argparse.Action, value: Any, file: str, key: str) -> str:
    """`value` as a command-line token, after the flag's own type and choices checks, so a bad
    value is reported against the file's key, not against the flag it becomes."""
    text = str(value)
    try:
        parsed = action.type(text) if callable(action.type) else text
    except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
        raise UsageError(f"--config {file}: key {key!r}: {e}") from None
    if action.choices is not None and parsed not in action.choices:
        raise UsageError(f"--config {file}: key {key!r}: {value!r} is not one of "
                         f"{', '.join(map(str, action.choices))}")
    return text


# ---------------------------------------------------------------------- LLaMA-Factory keys
Pairs = list[tuple[Optional[str], Any]]


# The LLaMA-Factory keys whose value may be a list (the others take one scalar).
LF_LIST_KEYS = {"lora_target", "report_to", "dataset", "eval_dataset"}


def _translated(key: str, value: Any, values: dict, path: str, stage: Optional[str]) -> Pairs:
    """LF_KEYS[key]'s (dest, value) pairs, a value of the wrong shape or type named with its key."""
    scalar = value is None or isinstance(value, (str, int, float, bool))
    if not scalar and not (key in LF_LIST_KEYS and isinstance(value, list)
                           and all(isinstance(v, (str, int, float)) for v in value)):
        raise UsageError(f"--config {path}: key {key!r}: expected "
                         f"{'a value or a list of values' if key in LF_LIST_KEYS else 'a single value'}, "
                         f"got {type(value).__name__} {value!r}"[:300])
    try:
        return LF_KEYS[key](value, values, path, stage)
    except (TypeError, ValueError) as e:
        raise UsageError(f"--config {path}: key {key!r}: {value!r} is not a valid value ({e})") from None


def _same(dest: str) -> Callable[..., Pairs]:
    return lambda value, values, path, stage: [(dest, value)]


def _positive_or_off(dest: str) -> Callable[..., Pairs]:
    # HF TrainingArguments use -1 / 0 for "not set"
    return lambda value, values, path, stage: [(dest, value)] if isinstance(value, (int, float)) and value > 0 else []


def _stage(value, values, path, stage) -> Pairs:
    mine = LF_STAGES.get(value)
    if mine is None:
        raise UsageError(f"--config {path}: stage {value!r} is not supported (expected one of {sorted(LF_STAGES)})")
    if stage is not None and mine != stage:
        raise UsageError(f"--config {path}: stage {value!r} is run by examples/{mine}.py, not by {stage}.py")
    return []


def _finetuning_type(value, values, path, stage) -> Pairs:
    if value not in ("lora", "full"):
        raise UsageError(f"--config {path}: finetuning_type {value!r} is not supported (expected lora or full)")
    return [("finetuning", value)]


def _lora_target(value, values, path, stage) -> Pairs:
    names = value if isinstance(value, list) else [t.strip() for t in str(value).split(",")]
    return [("lora_targets", "all-linear" if names in (["all"], ["all-linear"]) else ",".join(names))]


def _scheduler(value, values, path, stage) -> Pairs:
    if value in ("cosine", "linear", "constant", "constant_with_warmup"):
        return [("lr_scheduler", value)]
    return [(None, f"{value!r} (schedules here: cosine, linear, constant, constant_with_warmup)")]


def _cutoff_len(value, values, path, stage) -> Pairs:
    return [("block_size" if stage == "cpt" else "max_len", value)]


def _precision(value, values, path, stage) -> Pairs:
    # bf16 / fp16 / pure_bf16: true picks that dtype; all of them false means fp32 (seed 004's fallback)
    chosen = [k for k in ("bf16", "pure_bf16", "fp16") if values.get(k) is True]
    if chosen:
        return [("dtype", "fp16" if chosen[0] == "fp16" else "bf16")]
    return [("dtype", "fp32")]


def _quantization_bit(value, values, path, stage) -> Pairs:
    if value in (None, 0):
        return []
    if int(value) != 4:
        raise UsageError(f"--config {path}: quantization_bit {value}: only 4-bit NF4 (QLoRA) is supported")
    return [("qlora", True)]


def _val_size(value, values, path, stage) -> Pairs:
    if isinstance(value, (int, float)) and 0 <= value < 1:
        return [("eval_fraction", value)]
    return [(None, f"{value!r} (a fraction in [0, 1) here)")]


def _report_to(value, values, path, stage) -> Pairs:
    # HF's names: "all" / a list; only TensorBoard is written here (metrics.jsonl always)
    names = value if isinstance(value, list) else [value]
    chosen = "tensorboard" if any(n in ("tensorboard", "all") for n in names) else "none"
    skipped = [(None, f"{n} (only tensorboard is written here)") for n in names
               if n not in ("tensorboard", "none", None)]
    return [("report_to", chosen)] + skipped


def _bool(key: str, value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise UsageError(f"--config {path}: key {key!r}: expected true or false, got {value!r}")
    return value


def _gradient_checkpointing_off(value, values, path, stage) -> Pairs:
    return [("no_grad_checkpointing", _bool("disable_gradient_checkpointing", value, path))]


def _gradient_checkpointing(value, values, path, stage) -> Pairs:
    if "disable_gradient_checkpointing" in values:   # LLaMA-Factory's own switch decides
        return []
    return [("no_grad_checkpointing", not _bool("gradient_checkpointing", value, path))]


def _only(*accepted: Any, note: str) -> Callable[..., Pairs]:
    """A key honoured only with one of `accepted` (what this library always does); else named."""
    return lambda value, values, path, stage: [] if value in accepted else [(None, f"{value!r} ({note})")]


def _optim(value, values, path, stage) -> Pairs:
    if value in ADAMW_OPTIMS:
        return []
    return [(None, f"{value} is not supported; training with AdamW (fp32 states)")]


def _overwrite(value, values, path, stage) -> Pairs:
    return [("overwrite", _bool("overwrite_output_dir", value, path))]


def _resume(value, values, path, stage) -> Pairs:
    return [("resume", True)] if value else []


def _template(value, values, path, stage) -> Pairs:
    if value in LF_QWEN_TEMPLATES:
        return []   # the model's own chat template is rendered, as the model is served
    return [(None, f"{value!r} (the model's own chat template is used)")]


def _datasets(value, values, path, stage) -> Pairs:
    return [("data", dataset_files(value, values, path))]


def _eval_dataset(value, values, path, stage) -> Pairs:
    files = dataset_files(value, values, path)
    if len(files) != 1:
        return [(None, f"{value!r} (one held-out file here)")]
    return [("eval_data", files[0])]


def _pref_loss(value, values, path, stage) -> Pairs:
    return [("loss", value)]


def dataset_files(value: Any, values: dict, path: str) -> list[str]:
    """LLaMA-Factory `dataset` names -> files, through `dataset_dir`/dataset_info.json (a name may
    also be a file path)."""
    names = value if isinstance(value, list) else [n.strip() for n in str(value).split(",") if n.strip()]
    base = Path(path).parent
    folder = Path(values.get("dataset_dir", "data"))
    folder = folder if folder.is_absolute() else (base / folder if (base / folder).is_dir() else folder)
    info_file = folder / "dataset_info.json"
    info = {}
    if info_file.is_file():
        try:
            info = read_json(info_file, UsageError, dict)
        except UsageError as e:
            raise UsageError(f"--config {path}: dataset_dir: {e}") from None
    files = []
    for name in names:
        entry = info.get(name)
        if isinstance(entry, dict) and entry.get("file_name"):
            files.append(str(folder / entry["file_name"]))
        elif (folder / name).exists():
            files.append(str(folder / name))
        elif Path(name).exists():
            files.append(name)
        else:
            where = f"{info_file}" if info_file.is_file() else f"{folder} (no dataset_info.json there)"
            raise UsageError(f"--config {path}: dataset {name!r} is not in {where}; give a file path or a "
                             "dataset_info.json entry with file_name (hub datasets are not downloaded)")
    return files


LF_KEYS: dict[str, Callable[..., Pairs]] = {
    "model_name_or_path": _same("model"),
    "stage": _stage,
    "finetuning_type": _finetuning_type,
    "lora_rank": _same("lora_r"),
    "lora_alpha": _same("lora_alpha"),
    "lora_dropout": _same("lora_dropout"),
    "lora_target": _lora_target,
    "use_rslora": _same("use_rslora"),
    "use_dora": _same("use_dora"),
    "learning_rate": _same("lr"),
    "num_train_epochs": _same("epochs"),
    "max_steps": _positive_or_off("max_steps"),
    "per_device_train_batch_size": _same("batch_size"),
    "gradient_accumulation_steps": _same("grad_accum"),
    "lr_scheduler_type": _scheduler,
    "warmup_ratio": _positive_or_off("warmup_ratio"),
    "warmup_steps": _positive_or_off("warmup_steps"),
    "max_grad_norm": _same("max_grad_norm"),
    "weight_decay": _same("weight_decay"),
    "cutoff_len": _cutoff_len,
    "bf16": _precision,
    "fp16": _precision,
    "pure_bf16": _precision,
    "output_dir": _same("out"),
    "overwrite_output_dir": _overwrite,
    "resume_from_checkpoint": _resume,
    "save_steps": _positive_or_off("save_every"),
    "save_total_limit": _positive_or_off("keep_last"),
    "logging_steps": _positive_or_off("log_every"),
    "eval_steps": _positive_or_off("eval_every"),
    "val_size": _val_size,
    "seed": _same("seed"),
    "quantization_bit": _quantization_bit,
    "disable_gradient_checkpointing": _gradient_checkpointing_off,
    "gradient_checkpointing": _gradient_checkpointing,
    "optim": _optim,
    "quantization_method": _only("bitsandbytes", "bnb", note="NF4 through our own kernels"),
    "quantization_type": _only("nf4", note="only NF4 here"),
    "report_to": _report_to,
    "dataset": _datasets,
    "dataset_dir": lambda value, values, path, stage: [],   # read by `dataset`
    "eval_dataset": _eval_dataset,
    "template": _template,
    "pref_beta": _same("beta"),
    "pref_loss": _pref_loss,
    "simpo_gamma": _same("simpo_gamma"),
    "dpo_label_smoothing": _same("label_smoothing"),
}
