"""The checkpoints of a run on disk: finding the newest complete one, keeping the last K and the
best, and cleaning up after a crash.

    newest_checkpoint(root)                     # Path of the highest complete step-N, or None
    prune_checkpoints(root, keep_last=2, best=best_checkpoint(root))
    recover_checkpoints(root)                   # on start: undo what a crash left behind

A checkpoint directory exists under its final name only once it is complete (models.qwen.atomic):
it is staged as `.tmp-step-N-<pid>` and renamed into place, and it lists its files and their
sizes in state.json (written last). Pruning renames a directory to `.del-step-N-<pid>` before
deleting it, so a kill mid-delete never leaves a half-deleted `step-N`. A `step-N` whose files do
not match its list (damaged by hand, or by an older version) is not a checkpoint.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from pathlib import Path
from typing import Optional, Union

from models.qwen import CheckpointError
from models.qwen.atomic import recover_all, remove_tree

from .files import read_json

PathLike = Union[str, os.PathLike]
STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "state.json"


def step_of(path: Path) -> Optional[int]:
    m = STEP_DIR.match(path.name)
    return int(m.group(1)) if m else None


def file_sizes(directory: Path) -> dict[str, int]:
    """{relative path: size} of every file under `directory` (the list state.json records)."""
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}


def is_complete(path: Path) -> bool:
    """A step-N directory with its state.json, holding exactly the files of the size it lists."""
    state_file = path / STATE_FILE
    if not state_file.is_file():
        return False
    try:
        listed = read_json(state_file).get("files")
    except (CheckpointError, AttributeError):
        return False
    if listed is None:   # written before checkpoints listed their files
        return True
    sizes = file_sizes(path)
    sizes.pop(STATE_FILE, None)
    return sizes == listed


def complete_checkpoints(root: PathLike) -> list[Path]:
    """Complete step-N directories under `root`, oldest first (temporaries never count)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None and is_complete(p)]
    return sorted(found, key=step_of)


def newest_checkpoint(root: PathLike) -> Optional[Path]:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def best_checkpoint(root: PathLike) -> Optional[Path]:
    """The complete checkpoint with the lowest recorded val_loss (None if none has one)."""
    best, best_loss = None, math.inf
    for p in complete_checkpoints(root):
        try:
            v = read_json(p / STATE_FILE).get("val_loss")
        except CheckpointError:
            continue
        if v is not None and v < best_loss:
            best, best_loss = p, v
    return best


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
            remove_tree(p)
            deleted.append(p)
    return deleted


def recover_checkpoints(root: PathLike) -> list[Path]:
    """On start: restore checkpoints a crash left between two renames, delete staging and
    half-deleted leftovers, and remove step-N directories that are not complete. Returns the
    removed incomplete ones."""
    root = Path(root)
    if not root.is_dir():
        return []
    recover_all(root)
    removed = []
    for p in root.iterdir():
        if p.is_dir() and step_of(p) is not None and not is_complete(p):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed
