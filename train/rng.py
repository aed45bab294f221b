"""Every random-number generator's state, captured and restored without pickle.

    tensors, meta = capture_rng_state()      # safetensors-ready tensors + JSON-ready dict
    restore_rng_state(tensors, meta)

Python's `random` state is a tuple of ints (JSON), NumPy's MT19937 state is a uint32 key
array (tensor) plus position and Gaussian cache (JSON), torch's CPU and CUDA states are byte
tensors. Restoring all of them makes dropout masks, shuffles and sampling after a resume
identical to the run that was never interrupted.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture_rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, meta): tensors "torch_cpu", "numpy_key", "cuda.{i}"; meta holds the rest."""
    version, internal, gauss = random.getstate()
    kind, key, pos, has_gauss, cached = np.random.get_state()
    tensors = {
        "torch_cpu": torch.get_rng_state().clone(),
        "numpy_key": torch.from_numpy(np.asarray(key, dtype=np.uint32).astype(np.int64)),
    }
    cuda_count = 0
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state.clone()
        cuda_count = torch.cuda.device_count()
    meta = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "cuda_devices": cuda_count,
    }
    return tensors, meta


def restore_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`; a missing piece is an error naming it."""
    for key in ("torch_cpu", "numpy_key"):
        if key not in tensors:
            raise KeyError(f"RNG state: tensor {key!r} missing")
    for key in ("python", "numpy"):
        if key not in meta:
            raise KeyError(f"RNG state: entry {key!r} missing")
    py = meta["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    nps = meta["numpy"]
    np.random.set_state(
        (nps["kind"], tensors["numpy_key"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"], nps["cached_gaussian"])
    )
    torch.set_rng_state(tensors["torch_cpu"].to(torch.uint8))
    cuda = [tensors[f"cuda.{i}"] for i in range(int(meta.get("cuda_devices", 0))) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            raise ValueError(
                f"RNG state holds {len(cuda)} CUDA generator(s) but {torch.cuda.device_count()} device(s) are visible"
            )
        torch.cuda.set_rng_state_all([c.to(torch.uint8) for c in cuda])
