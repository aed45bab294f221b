"""The files of a training checkpoint: safetensors tensors, JSON, and optimizer state without pickle.

    save_tensors(tmp / "optimizer.safetensors", tensors); write_json(tmp / "state.json", meta)
    tensors, meta = optimizer_to_files(optimizer); optimizer.load_state_dict(optimizer_from_files(tensors, meta))

Every read names the file (and the key) that is missing or damaged: a CheckpointError (from
fileio's checked reader), never a KeyError or a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fileio import safe_load
from fileio.errors import CheckpointError
from fileio.safetensors_file import load_tensors as read_tensor_file, write_tensors


def write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")


def read_json(path: Path) -> Any:
    try:
        return safe_load.read_json(path, CheckpointError)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors file of the tensors (any device, views sharing storage included: each is
    written as its own contiguous CPU bytes)."""
    write_tensors(tensors, path)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    return read_tensor_file(path)   # a damaged file: a CheckpointError naming it


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


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any], optimizer: torch.optim.Optimizer,
                         where: Path) -> dict[str, Any]:
    """Inverse of `optimizer_to_files`: a state_dict for `optimizer.load_state_dict`, checked against
    the optimizer's parameters (every state tensor present, of the parameter's shape) so that a
    damaged or foreign file is an error naming the file and key."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        parts = name.split(".", 2)
        if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit():
            raise CheckpointError(f"{where}: unexpected tensor {name!r} (expected state.<index>.<key>)")
        idx = int(parts[1])
        if idx >= len(params):
            raise CheckpointError(f"{where}: tensor {name!r} is for parameter {idx}, the optimizer has {len(params)}")
        if value.shape != params[idx].shape and value.dim() > 0:
            raise CheckpointError(f"{where}: tensor {name!r} has shape {tuple(value.shape)}, its parameter "
                                  f"{tuple(params[idx].shape)}")
        state.setdefault(idx, {})[parts[2]] = value
    if not isinstance(meta, dict) or not isinstance(meta.get("param_groups"), list):
        raise CheckpointError(f"{where.with_suffix('.json')}: missing key 'param_groups'")
    for idx, values in (meta.get("scalar_state") or {}).items():
        state.setdefault(int(idx), {}).update(values)
    if state:
        keys = sorted(set(next(iter(state.values()))))
        for i in range(len(params)):
            missing = [k for k in keys if k not in state.get(i, {})]
            if missing:
                raise CheckpointError(f"{where}: missing tensor 'state.{i}.{missing[0]}'")
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}
