"""Write a directory atomically: stage it next to its final name, then rename it into place.

    with atomic_directory("out/merged") as tmp:     # tmp: a fresh hidden sibling directory
        save_file(tensors, tmp / "model.safetensors"); ...
    # -> out/merged now holds exactly what was written; a previous out/merged was replaced whole

The staging directory is `.tmp-<name>-<pid>` beside the final one. On an exception it is
removed and the final directory is untouched, so a crash mid-save never leaves a half-written
checkpoint under the real name. With fsync=True every file and directory is flushed to disk
before the rename (and the parent after it), so a power loss cannot leave the rename without
its data either. Used by model export (`models.qwen.save`), the weight-delta tools
(`lora.delta`) and training checkpoints (`train.checkpoint`).
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, os.PathLike]


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file, then every directory bottom-up, under `root`."""
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        for f in files:
            _fsync_path(Path(dirpath) / f)
        _fsync_path(Path(dirpath))


@contextmanager
def atomic_directory(final: PathLike, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success rename it to `final` (replacing it).

    On an exception the temporary directory is removed and `final` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if fsync:
            fsync_tree(tmp)
        old = None
        if final.exists():  # replacing an earlier save: swap, then drop the old one
            old = final.parent / f".old-{final.name}-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        if fsync:
            _fsync_path(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
