"""What a training run's inputs were when it started, so that --resume can refuse inputs that
changed in place (same paths, other content): recorded in run.json under "inputs".

    {"--model": {"config.json": sha256, "model.safetensors": sampled digest, ...},
     "--data": {path: sha256, ...}, "--eval-data": {path: sha256}}

The model folder's small files (config, tokenizer, chat template, index) are hashed whole; its
safetensors files by their header and sampled blocks (fileio/hashing.py: ~1 MiB read per
file, so a 15 GB checkpoint costs milliseconds). Data files are hashed whole (the token cache
reads them whole anyway).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

from fileio.atomic import LOCK_FILE, RUN_FILE
from fileio.hashing import sampled_digest, sha256_file

WHOLE_LIMIT = 64 << 20   # files up to 64 MiB are hashed whole; larger ones by samples


def file_digest(path: Path) -> str:
    if path.suffix == ".safetensors":
        return sampled_digest(path, header=True)
    return sha256_file(path) if path.stat().st_size <= WHOLE_LIMIT else sampled_digest(path)


def folder_digests(root: Path, recursive: bool = True) -> dict:
    """{relative path: digest} of the files in `root` (and below, `recursive`) but our own run
    marker and lock."""
    return {str(p.relative_to(root)): file_digest(p) for p in sorted(root.rglob("*") if recursive else root.iterdir())
            if p.is_file() and p.name not in (RUN_FILE, LOCK_FILE)}


def path_digests(paths: Iterable[Path]) -> dict:
    out = {}
    for p in map(Path, paths):
        if p.is_dir():
            out.update({str(p / k): v for k, v in folder_digests(p).items()})
        elif p.is_file():
            out[str(p)] = file_digest(p)
    return out


def training_inputs(model_dir: Path, data: Iterable[Path], eval_data: Optional[Path] = None) -> dict:
    """The fingerprint of a training run's inputs (see the module docstring)."""
    # A model is the files of its folder (HF layout: no subfolders).
    prints = {"--model": folder_digests(Path(model_dir).resolve(), recursive=False),
              "--data": path_digests(Path(p).resolve() for p in data)}
    if eval_data is not None:
        prints["--eval-data"] = path_digests([Path(eval_data).resolve()])
    return prints


def first_change(old: Optional[dict], new: dict, model_dir: str = "") -> Optional[str]:
    """How the inputs changed ("--model DIR: model.safetensors changed"), or None when they did
    not (or `old` predates fingerprints)."""
    if not isinstance(old, dict):
        return None
    for flag in sorted(set(old) | set(new)):
        before, now = old.get(flag) or {}, new.get(flag) or {}
        for name in sorted(set(before) | set(now)):
            if before.get(name) != now.get(name):
                what = "is new" if name not in before else "is gone" if name not in now else "changed"
                where = f"{flag} {model_dir}: {name}" if flag == "--model" else f"{flag} {name}"
                return f"{where} {what}"
    return None
