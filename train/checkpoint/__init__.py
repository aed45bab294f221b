"""Training checkpoints: the files (files.py), the step-N directories on disk (store.py) and what
a checkpoint holds (state.py). See each module's docstring."""

from fileio.atomic import atomic_directory
from models.qwen import CheckpointError

from .files import load_tensors, optimizer_from_files, optimizer_to_files, read_json, save_tensors, write_json
from .state import Checkpoint, copy_into, rng_name, write_checkpoint
from .store import (
    STATE_FILE,
    best_checkpoint,
    complete_checkpoints,
    newest_checkpoint,
    prune_checkpoints,
    recover_checkpoints,
    step_of,
)

__all__ = [
    "CheckpointError", "atomic_directory", "load_tensors", "save_tensors", "read_json", "write_json",
    "optimizer_to_files", "optimizer_from_files", "Checkpoint", "copy_into", "rng_name", "write_checkpoint",
    "STATE_FILE", "best_checkpoint", "complete_checkpoints", "newest_checkpoint", "prune_checkpoints",
    "recover_checkpoints", "step_of",
]
