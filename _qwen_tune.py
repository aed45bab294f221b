"""Our top-level packages find each other, whatever a user's project folder holds.

The packages import each other by top-level name (`from models.qwen import load` in lora,
`from data import DataLoader` in train), and Python looks in the script's folder (or, for
`python -m` / `-c`, the working directory) first, so a user's own `train.py` or `data/__init__.py`
there would be found instead of ours. Each package's __init__ therefore calls `claim(__name__)`
first: from then on, in this process, its name and the names of the packages it depends on
resolve to the folders beside this file (a finder placed at the front of sys.meta_path), and a
module of the user's already imported under one of those names is refused in one line.

A user's own `import train` before any of ours is left to Python: in their project, their
`train.py` is what they mean. Folders without __init__.py (namespace dirs such as a
LLaMA-Factory `data/`) never hide ours: our folders are on sys.path as regular packages (in
site-packages, or the project root for `pip install -e .`), and Python prefers those.
"""

from __future__ import annotations

import os
import sys
from importlib.machinery import ModuleSpec, PathFinder

# The dependency order of the design (a package imports only packages to its left).
ORDER = ("fileio", "models", "quant", "lora", "data", "train", "cli", "demo", "examples")

ROOT = os.path.dirname(os.path.abspath(__file__))  # site-packages, or the project root (pip install -e .)
_claimed: set[str] = set()


class _OurPackages:
    """MetaPathFinder: a claimed top-level name resolves to our package folder."""

    @classmethod
    def find_spec(cls, fullname: str, path=None, target=None) -> ModuleSpec | None:
        if path is None and fullname in _claimed:
            return PathFinder.find_spec(fullname, [ROOT])
        return None


def _needs(name: str) -> tuple[str, ...]:
    """`name` and the packages it may import (every package to its left in ORDER)."""
    return ORDER[: ORDER.index(name) + 1]


def _origin(module) -> str:
    """Where a module was loaded from: its file, or its folders for a namespace package."""
    file = getattr(module, "__file__", None)
    return file if file else ", ".join(list(getattr(module, "__path__", None) or ["an unknown location"]))


def _is_ours(module, name: str) -> bool:
    file = getattr(module, "__file__", None)
    try:
        return bool(file) and os.path.samefile(file, os.path.join(ROOT, name, "__init__.py"))
    except OSError:  # a file that has gone, or a module that was never a file
        return False


def claim(name: str) -> None:
    """Make `name` and each package it depends on resolve to ours for the rest of this process.

    Raises ImportError (one line) when a module of another origin is already imported under one
    of those names: a process holds one module per name, and ours needs its own.
    """
    for needed in _needs(name):
        module = sys.modules.get(needed)
        if module is not None and not _is_ours(module, needed):
            raise ImportError(
                f"qwen-tune's {name!r} needs its own package {needed!r}, but {needed!r} is already "
                f"imported from {_origin(module)}: rename that file or folder (one process holds one "
                f"module named {needed!r})")
        _claimed.add(needed)
    if _OurPackages not in sys.meta_path:
        sys.meta_path.insert(0, _OurPackages)
