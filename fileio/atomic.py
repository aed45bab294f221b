"""Write a directory atomically: stage it next to its final name, then rename it into place.

    with atomic_directory("out/merged") as tmp:     # tmp: a fresh hidden sibling directory
        save_file(tensors, tmp / "model.safetensors"); ...
    # -> out/merged now holds exactly what was written; a previous out/merged was replaced whole

The staging directory is `.tmp-<name>-<pid>` beside the final one. Replacing an existing
directory takes two renames (the old one to `.old-<name>-<pid>`, the new one into place), so a
crash between them leaves the old, complete directory under `.old-*`: `recover(final)` (run by
every atomic_directory and by the training loop on start) puts it back, so no sequence of
crashes loses the last complete version. With fsync=True every file and directory is flushed to
disk before the rename (and the parent after it). `keep` names entries of the replaced directory
that belong to whoever uses it, not to its content (by default OWNER_FILES: the lock and
run.json of a script's --out): they are hard-linked into the new one, so a lock held on them
stays held.

Used by model export (`models.qwen.save`), the weight-delta tools (`lora.delta`), training
checkpoints (`train.checkpoint`) and PEFT adapters (`lora.save`).
"""

from __future__ import annotations

import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence, Union

PathLike = Union[str, os.PathLike]
# The files of a folder that belong to the run writing it, not to its content: the exclusive
# lock of the script using the folder as --out, and run.json (which script wrote it, with which
# settings). A replacement keeps them (hard links: the very same files, so the lock stays held).
LOCK_FILE = ".qwen-tune.lock"
RUN_FILE = "run.json"
OWNER_FILES = (LOCK_FILE, RUN_FILE)
_STAGED = re.compile(r"^\.(tmp|old|del)-(.+)-(\d+)$")


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain open() would give a new file here (0o666 less the umask): files staged with
    tempfile (0o600) get it before they are renamed into place, so a team can read them."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """The mode a plain mkdir() would give a new directory here (0o777 less the umask), for
    directories staged with tempfile.mkdtemp (0o700)."""
    return 0o777 & ~_umask()


def recover(final: PathLike) -> None:
    """Undo what a crash left around `final`: put back a complete `.old-*` version when `final`
    itself is missing, and delete staging (`.tmp-*`) and half-deleted (`.del-*`) leftovers."""
    final = Path(final)
    parent = final.parent
    if not parent.is_dir():
        return
    for p in sorted(parent.iterdir()):
        m = _STAGED.match(p.name)
        if not m or m.group(2) != final.name or not p.is_dir():
            continue
        if m.group(1) == "old" and not final.exists():
            os.replace(p, final)
        else:
            shutil.rmtree(p, ignore_errors=True)


def recover_all(parent: PathLike) -> None:
    """`recover` every staged directory under `parent` (after a crash, on start)."""
    parent = Path(parent)
    if not parent.is_dir():
        return
    names = {m.group(2) for p in parent.iterdir() if (m := _STAGED.match(p.name))}
    for name in sorted(names):
        recover(parent / name)


def remove_tree(path: PathLike) -> None:
    """Delete a directory so that a crash midway never leaves it half-deleted under its name:
    rename it to `.del-<name>-<pid>` first (atomic), then delete that."""
    path = Path(path)
    doomed = path.parent / f".del-{path.name}-{os.getpid()}"
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


@contextmanager
def atomic_directory(final: PathLike, fsync: bool = True, keep: Sequence[str] = OWNER_FILES) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success rename it to `final` (replacing it).

    On an exception the temporary directory is removed and `final` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover(final)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        for name in keep:
            if (final / name).is_file() and not (tmp / name).exists():
                os.link(final / name, tmp / name)
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
