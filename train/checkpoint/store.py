"""The checkpoints of a run on disk: finding the newest complete one, keeping the last K and the
best, and cleaning up after a crash.

    newest_checkpoint(root)                     # Path of the highest complete step-N, or None
    prune_checkpoints(root, keep_last=2, best=best_checkpoint(root))
    recover_checkpoints(root)                   # on start: undo what a crash left behind

A checkpoint directory exists under its final name only once it is complete (fileio.atomic):
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

from fileio.atomic import recover_all, remove_tree
from models.qwen import CheckpointError

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


def damage(path: Path) -> Optional[str]:
    """Why the step-N directory `path` is not a usable checkpoint, or None when it is: it needs its
    state.json, and the files with the sizes that state.json lists (older checkpoints list none)."""
    state_file = path / STATE_FILE
    if not state_file.is_file():
        return f"{state_file}: missing"
    try:
        listed = read_json(state_file).get("files")
    except (CheckpointError, AttributeError) as e:
        return str(e)
    if listed is None:
        return None
    sizes = file_sizes(path)
    sizes.pop(STATE_FILE, None)
    for name, size in sorted(listed.items()):
        if name not in sizes:
            return f"{path / name}: missing"
        if sizes[name] != size:
            return f"{path / name}: {sizes[name]} bytes, state.json recorded {size} (changed after it was written)"
    extra = sorted(set(sizes) - set(listed))
    return f"{path / extra[0]}: not part of the checkpoint state.json describes" if extra else None


def is_complete(path: Path) -> bool:
    return damage(path) is None


def _step_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and step_of(p) is not None), key=step_of)


def complete_checkpoints(root: PathLike) -> list[Path]:
    """Complete step-N directories under `root`, oldest first (temporaries never count)."""
    return [p for p in _step_dirs(Path(root)) if is_complete(p)]


def newest_checkpoint(root: PathLike) -> Optional[Path]:
    """The newest checkpoint (None when there is none). A damaged newest one is an error naming
    the file, never a silent fall-back to an older one: resuming from it would not be the run."""
    found = [p for p in _step_dirs(Path(root)) if (p / STATE_FILE).is_file()]
    if not found:
        return None
    problem = damage(found[-1])
    if problem is not None:
        older = [p.name for p in found[:-1] if is_complete(p)]
        hint = f"; delete {found[-1]} to resume from {older[-1]}" if older else ""
        raise CheckpointError(f"checkpoint {found[-1].name} is damaged: {problem}{hint}")
    return found[-1]


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
    half-deleted leftovers: `.del-*`, step-N directories without their state.json, and
    incomplete ones older than a complete checkpoint (what an interrupted delete of an older
    version left). Returns the removed step-N directories."""
    root = Path(root)
    if not root.is_dir():
        return []
    recover_all(root)
    removed = []
    steps = _step_dirs(root)
    newest_complete = max((step_of(p) for p in steps if is_complete(p)), default=-1)
    for p in steps:
        if not (p / STATE_FILE).is_file() or (step_of(p) < newest_complete and not is_complete(p)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed
