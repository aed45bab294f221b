"""--config FILE: flag values from YAML or JSON, in our names or in LLaMA-Factory's.

Our names are the flags without dashes (`lora-r: 16` or `lora_r: 16`). A LLaMA-Factory recipe
(`llamafactory-cli train qwen_lora_sft.yaml`, recognised by its keys) runs unchanged: its keys
are translated (the translations in cli/llama_factory.py, which key sets which option in
cli/options.py), and every key is either honoured or named in one line on stderr (an
unknown key in a file of our own names is an error: it is a typo). A bad value names the
file and its key, not the flag it became.

A recipe's settings take the defaults of the convention it comes from, as `llamafactory-cli`
would run it: what the recipe leaves out is LLaMA-Factory 0.9.5's / HF TrainingArguments'
default (`LF_DEFAULTS`, declared with each option in cli/options.py: lora_rank 8, lora_alpha
twice the rank, lora_dropout 0, lora_target all, learning_rate 5e-5, lr_scheduler_type linear,
no warm-up, weight_decay 0, max_grad_norm 1.0, num_train_epochs 3, per_device_train_batch_size
8, gradient_accumulation_steps 1, seed 42, logging_steps and save_steps 500, cutoff_len 2048,
val_size 0), not this script's. Flags on the command line still win. As in HF's Trainer,
max_steps > 0 wins over num_train_epochs and warmup_steps > 0 over warmup_ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

from fileio.safe_load import loads_json, loads_yaml

from . import options
from .errors import UsageError
from .llama_factory import LF_HARMLESS, Pairs, Translation

# The LLaMA-Factory keys and what a recipe runs with where it is silent, generated from the
# options' declarations (cli/options.py): key -> translation, the keys whose value may be a list,
# dest -> LLaMA-Factory's / HF's default, and dest -> the other of its pair (a default of one is
# left out when the recipe sets the other: warmup_steps would win over warmup_ratio).
LF_KEYS: dict[str, Translation] = options.lf_keys()
LF_LIST_KEYS: frozenset[str] = options.lf_list_keys()
LF_DEFAULTS: dict[str, Any] = options.lf_defaults()
LF_RIVALS: dict[str, str] = options.lf_rivals()


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
    # Another convention's name of one of our options (TRL's KTOConfig max_length: max_len) is
    # read as that option, unless the file also sets it by our name.
    for key, dest in getattr(p, "config_aliases", {}).items():
        if key in values and dest not in {_dest(k) for k in values}:
            values[dest] = values.pop(key)
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


