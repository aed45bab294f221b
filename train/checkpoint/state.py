"""What a training checkpoint holds, written atomically and read back with every piece checked.

    write_checkpoint(root / "step-40", trainable=..., frozen=None, adapter_model=model,
                     optimizer=optimizer_to_files(opt), rng_states=[capture_rng_state()], state={...})
    ckpt = read_checkpoint(root / "step-40")      # state.json checked: every required key present
    ckpt.tensors("trainable.safetensors"); ckpt.optimizer_state(opt); ckpt.rng(rank)

Files: trainable.safetensors (every trainable parameter by name: the adapter, or the full model),
model.safetensors (the frozen base, when the run's phase says so: train.phases
FineTuningPlan.saves_base, after the switch of the two-phase mode), adapter/ (PEFT format,
when the model has adapters), optimizer.safetensors + optimizer.json, rng.safetensors +
rng.json (rng-rank{r}.* for the other ranks of a distributed run), state.json (steps, schedule,
sampler, loss scaler, guards, config, world size, the phase (one of train.phases.PHASES), and
the list of files with their sizes; written last). A damaged or tampered file is a
CheckpointError naming the file and the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from fileio.atomic import atomic_directory
from models.qwen import CheckpointError

from ..phases import PHASES
from .files import load_tensors, optimizer_from_files, read_json, save_tensors, write_json
from .store import STATE_FILE, file_sizes

REQUIRED_STATE = ("step", "micro_step", "total_steps", "phase", "sampler", "scaler", "bad_in_a_row",
                  "skipped_steps", "config")


def rng_name(rank: int) -> str:
    """Stem of a rank's RNG files: rng (rank 0, as in a single process), rng-rank{r}."""
    return "rng" if rank == 0 else f"rng-rank{rank}"


def write_checkpoint(final: Path, *, trainable: dict[str, torch.Tensor], frozen: Optional[dict[str, torch.Tensor]],
                     adapter_model: Optional[nn.Module], optimizer: tuple[dict, dict],
                     rng_states: list[tuple[dict, dict]], state: dict[str, Any],
                     extra: Optional[dict[str, dict[str, torch.Tensor]]] = None) -> Path:
    """Write the checkpoint directory `final` atomically (see the module docstring). `extra`:
    more tensor files, {file name: tensors} (e.g. a batch source's per-rank state)."""
    with atomic_directory(final) as tmp:
        save_tensors(tmp / "trainable.safetensors", trainable)
        if frozen is not None:
            save_tensors(tmp / "model.safetensors", frozen)
        if adapter_model is not None:
            import lora

            lora.save(adapter_model, tmp / "adapter")
        save_tensors(tmp / "optimizer.safetensors", optimizer[0])
        write_json(tmp / "optimizer.json", optimizer[1])
        for r, (tensors, meta) in enumerate(rng_states):
            save_tensors(tmp / f"{rng_name(r)}.safetensors", tensors)
            write_json(tmp / f"{rng_name(r)}.json", meta)
        for name, tensors in (extra or {}).items():
            save_tensors(tmp / name, tensors)
        write_json(tmp / STATE_FILE, {**state, "files": file_sizes(tmp)})
    return final


class Checkpoint:
    """A checkpoint directory opened for reading; `state` is its checked state.json."""

    def __init__(self, path: Path):
        self.path = Path(path)
        state = read_json(self.path / STATE_FILE)
        if not isinstance(state, dict):
            raise CheckpointError(f"{self.path / STATE_FILE}: expected a JSON object")
        for key in REQUIRED_STATE:
            if key not in state:
                raise CheckpointError(f"{self.path / STATE_FILE}: missing key {key!r}")
        for key in ("step", "micro_step", "total_steps", "bad_in_a_row", "skipped_steps"):
            if not isinstance(state[key], int) or isinstance(state[key], bool) or state[key] < 0:
                raise CheckpointError(f"{self.path / STATE_FILE}: key {key!r} = {state[key]!r}: expected an int >= 0")
        if state["step"] > state["total_steps"]:
            raise CheckpointError(f"{self.path / STATE_FILE}: key 'step' = {state['step']} is past 'total_steps' "
                                  f"= {state['total_steps']}")
        if state["phase"] not in PHASES:
            raise CheckpointError(f"{self.path / STATE_FILE}: key 'phase' = {state['phase']!r}: expected one of {PHASES}")
        for key in ("sampler", "scaler", "config"):
            if not isinstance(state[key], dict):
                raise CheckpointError(f"{self.path / STATE_FILE}: key {key!r}: expected a JSON object")
        self.state = state

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def has(self, name: str) -> bool:
        return (self.path / name).is_file()

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        return load_tensors(self.path / name)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """A state_dict for `optimizer.load_state_dict`, checked against its parameter groups."""
        meta = read_json(self.path / "optimizer.json")
        names_then = [g.get("names") for g in meta.get("param_groups", [])] if isinstance(meta, dict) else None
        names_now = [g["names"] for g in optimizer.param_groups]
        if names_then != names_now:
            raise CheckpointError(f"{self.path / 'optimizer.json'}: key 'param_groups' does not match the model's "
                                  "trainable parameters (different LoRA targets/rank or mode?)")
        return optimizer_from_files(self.tensors("optimizer.safetensors"), meta, optimizer,
                                    self.path / "optimizer.safetensors")

    def rng(self, rank: int) -> Optional[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        """(tensors, meta) of a rank's RNG state, or None when the checkpointed run had no such rank."""
        stem = self.path / rng_name(rank)
        if rank > 0 and not stem.with_suffix(".safetensors").is_file():
            return None
        return self.tensors(stem.with_suffix(".safetensors").name), read_json(stem.with_suffix(".json"))


def copy_into(model: nn.Module, tensors: dict[str, torch.Tensor], file: Path, trainable: bool) -> None:
    """Copy tensors into the model's parameters of that trainability; every one must match."""
    from ..distributed import shard_as

    params = {n: p for n, p in model.named_parameters() if p.requires_grad == trainable}
    missing = sorted(set(params) - set(tensors))
    extra = sorted(set(tensors) - set(params))
    if missing or extra:
        raise CheckpointError(f"{file}: does not match the model's {'trainable' if trainable else 'frozen'} parameters"
                              + (f"; missing {missing[:3]}" if missing else "") + (f"; unexpected {extra[:3]}" if extra else ""))
    with torch.no_grad():
        for n, p in params.items():
            t = tensors[n]
            if t.shape != p.shape or t.dtype != p.dtype:
                raise CheckpointError(f"{file}: {n!r} is {t.dtype} {tuple(t.shape)}, the model has {p.dtype} {tuple(p.shape)}")
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise CheckpointError(f"{file}: {n!r} holds NaN or Inf")
            p.copy_(shard_as(t, p))   # FSDP2: this rank's shard of the full tensor
