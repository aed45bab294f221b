"""Training checkpoints on disk: atomic directories, optimizer state without pickle, retention.

    with atomic_directory(root / "step-100") as tmp:    # tmp: a fresh hidden directory
        save_tensors(tmp / "optimizer.safetensors", tensors); write_json(tmp / "state.json", meta)
    # -> renamed to step-100 only after every file and the directory were fsynced
    newest_checkpoint(root)            # Path of the highest complete step-N, or None
    prune_checkpoints(root, keep_last=2, best=step_of_best)

A checkpoint directory exists under its final name only once it is complete: it is written
as `.tmp-step-N-<pid>` next to it, each file fsynced, then renamed in one `os.replace` (atomic
on POSIX), and the parent fsynced. A crash at any point leaves at most a `.tmp-*` directory,
which `newest_checkpoint` never returns and the next save removes. A directory must also hold
`state.json` (written last) to count as complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors.torch import load_file, save_file

from models.qwen.atomic import atomic_directory, fsync_tree  # noqa: F401

PathLike = Union[str, os.PathLike]
STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "state.json"


class CheckpointError(RuntimeError):
    """A checkpoint directory that is missing, incomplete or does not match the run."""


# ---------------------------------------------------------------------- atomic writing
# atomic_directory / fsync_tree live in models.qwen.atomic (model export and lora.delta use
# them too); imported here as part of this module's interface.


def remove_stale_temporaries(root: PathLike) -> list[Path]:
    """Delete `.tmp-*` / `.old-*` leftovers of crashed saves under `root`; returns them."""
    root = Path(root)
    gone = []
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and (p.name.startswith(".tmp-") or p.name.startswith(".old-")):
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p)
    return gone


def write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")


def read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors file of CPU-contiguous tensors; shared storage is cloned (safetensors refuses it)."""
    out, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().to("cpu").contiguous()
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen and v.numel() > 0:
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        out[k] = v
    save_file(out, str(path))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


# ---------------------------------------------------------------------- optimizer state
def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """optimizer.state_dict() split into safetensors tensors ("state.<idx>.<key>") and JSON.

    Non-tensor state values (rare) and the param_groups go to the JSON half.
    """
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalar_state": scalars}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `optimizer_to_files`: a state_dict for optimizer.load_state_dict."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for idx, values in meta.get("scalar_state", {}).items():
        state.setdefault(int(idx), {}).update(values)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------------- finding and pruning
def step_of(path: Path) -> Optional[int]:
    m = STEP_DIR.match(path.name)
    return int(m.group(1)) if m else None


def complete_checkpoints(root: PathLike) -> list[Path]:
    """Complete step-N directories under `root`, oldest first (temporaries never count)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None and (p / STATE_FILE).is_file()]
    return sorted(found, key=step_of)


def newest_checkpoint(root: PathLike) -> Optional[Path]:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def prune_checkpoints(root: PathLike, keep_last: int, best: Optional[Path] = None) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints and `best`; returns deleted."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    found = complete_checkpoints(root)
    keep = set(found[-keep_last:])
    if best is not None:
        keep.add(Path(best))
    deleted = []
    for p in found:
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)
            deleted.append(p)
    return deleted
