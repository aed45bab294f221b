"""LLaMA-Factory's conventions: its stage names, the keys that change nothing here, and the
value translations of its recipe keys.

Which key sets which option is declared with the option (cli/options.py: `LF(key, ...)`); a
translation here turns one key's value into (dest, value) pairs, or (None, note) for a value
not honoured (named on stderr). `RECIPE_KEYS` are the keys read for the recipe itself (its
stage, where its data sets live, settings this library always has), which set no option.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from fileio.safe_load import read_json

from .errors import UsageError

Pairs = list[tuple[Optional[str], Any]]
Translation = Callable[[Any, dict, str, Optional[str]], Pairs]   # (value, all values, file, stage) -> pairs

# LLaMA-Factory's `stage` -> the script that runs it.
LF_STAGES = {"pt": "cpt", "sft": "sft", "dpo": "dpo", "rm": "reward", "kto": "kto"}
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
# Chat templates of LLaMA-Factory that mean "Qwen's ChatML": we render the model's own template.
LF_QWEN_TEMPLATES = {"qwen", "qwen3", "qwen3_nothink", "qwen2_vl", "default", "empty", "chatml"}


def same(dest: str) -> Callable[..., Pairs]:
    return lambda value, values, path, stage: [(dest, value)]


def positive_or_off(dest: str) -> Callable[..., Pairs]:
    # HF TrainingArguments use -1 / 0 for "not set"
    return lambda value, values, path, stage: [(dest, value)] if isinstance(value, (int, float)) and value > 0 else []


def _stage(value, values, path, stage) -> Pairs:
    mine = LF_STAGES.get(value)
    if mine is None:
        raise UsageError(f"--config {path}: stage {value!r} is not supported (expected one of {sorted(LF_STAGES)})")
    if stage is not None and mine != stage:
        raise UsageError(f"--config {path}: stage {value!r} is run by examples/{mine}.py, not by {stage}.py")
    return []


def finetuning_type(value, values, path, stage) -> Pairs:
    if value not in ("lora", "full"):
        raise UsageError(f"--config {path}: finetuning_type {value!r} is not supported (expected lora or full)")
    return [("finetuning", value)]


def lora_target(value, values, path, stage) -> Pairs:
    names = value if isinstance(value, list) else [t.strip() for t in str(value).split(",")]
    return [("lora_targets", "all-linear" if names in (["all"], ["all-linear"]) else ",".join(names))]


def scheduler(value, values, path, stage) -> Pairs:
    if value in ("cosine", "linear", "constant", "constant_with_warmup"):
        return [("lr_scheduler", value)]
    return [(None, f"{value!r} (schedules here: cosine, linear, constant, constant_with_warmup)")]


def cutoff_len(value, values, path, stage) -> Pairs:
    return [("block_size" if stage == "cpt" else "max_len", value)]


def precision(value, values, path, stage) -> Pairs:
    # bf16 / fp16 / pure_bf16: true picks that dtype; all of them false means fp32 (seed 004's fallback)
    chosen = [k for k in ("bf16", "pure_bf16", "fp16") if values.get(k) is True]
    if chosen:
        return [("dtype", "fp16" if chosen[0] == "fp16" else "bf16")]
    return [("dtype", "fp32")]


def quantization_bit(value, values, path, stage) -> Pairs:
    if value in (None, 0):
        return []
    if int(value) != 4:
        raise UsageError(f"--config {path}: quantization_bit {value}: only 4-bit NF4 (QLoRA) is supported")
    return [("qlora", True)]


def val_size(value, values, path, stage) -> Pairs:
    if isinstance(value, (int, float)) and 0 <= value < 1:
        return [("eval_fraction", value)]
    return [(None, f"{value!r} (a fraction in [0, 1) here)")]


def report_to(value, values, path, stage) -> Pairs:
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


def gradient_checkpointing_off(value, values, path, stage) -> Pairs:
    return [("no_grad_checkpointing", _bool("disable_gradient_checkpointing", value, path))]


def gradient_checkpointing(value, values, path, stage) -> Pairs:
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


def overwrite(value, values, path, stage) -> Pairs:
    return [("overwrite", _bool("overwrite_output_dir", value, path))]


def resume(value, values, path, stage) -> Pairs:
    return [("resume", True)] if value else []


def _template(value, values, path, stage) -> Pairs:
    if value in LF_QWEN_TEMPLATES:
        return []   # the model's own chat template is rendered, as the model is served
    return [(None, f"{value!r} (the model's own chat template is used)")]


def datasets(value, values, path, stage) -> Pairs:
    return [("data", dataset_files(value, values, path))]


def eval_dataset(value, values, path, stage) -> Pairs:
    files = dataset_files(value, values, path)
    if len(files) != 1:
        return [(None, f"{value!r} (one held-out file here)")]
    return [("eval_data", files[0])]


def pref_loss(value, values, path, stage) -> Pairs:
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


# Keys read for the recipe itself: they set no option (an unsupported value is refused or named).
RECIPE_KEYS: dict[str, Translation] = {
    "stage": _stage,
    "dataset_dir": lambda value, values, path, stage: [],   # read by `dataset`
    "optim": _optim,
    "template": _template,
    "quantization_method": _only("bitsandbytes", "bnb", note="NF4 through our own kernels"),
    "quantization_type": _only("nf4", note="only NF4 here"),
}
