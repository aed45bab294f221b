"""The model folders the weight-delta tools read (`ModelFolder`: row ranges of one tensor at a
time), and their output folders.

Reads and writes go through fileio.safetensors_file: a row range is a plain file read of those
rows' bytes (no memory map, so the resident set stays at one chunk whatever the size of the
checkpoint), and output shards are written by `SafetensorsWriter` tensor by tensor as they are
computed (every output shape and dtype is known first, so the header goes first and the data
follows chunk by chunk: a whole shard is never in memory).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Union

import torch

from fileio.atomic import OWNER_FILES
from fileio.errors import QwenTuneError
from fileio.hashing import sha256_file
from fileio.safe_load import read_json
from fileio.safetensors_file import DTYPES as ST_DTYPES, FileSlice, file_slices
from models.qwen import CheckpointError, ConfigError, QwenConfig
from models.qwen.checkpoint import SAFE_INDEX, checkpoint_files

EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"
MANIFEST = "manifest.json"

PathLike = Union[str, os.PathLike]


class DeltaError(QwenTuneError, ValueError):
    """Inputs that cannot be combined as asked (names the tensor, file or key that is wrong)."""


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what it is, read from the shard header (no data touched)."""

    file: Path
    dtype: torch.dtype
    shape: tuple

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


class ModelFolder:
    """An HF-format Qwen checkpoint directory (or a delta directory written by `diff`), opened
    lazily: only headers and config.json are read here.

    role: what the directory is in the operation ("base", "chat", "target", "delta 1", ...);
    every error message names it together with the path.
    """

    def __init__(self, path: PathLike, role: str):
        self.root = Path(path)
        self.role = role
        if not self.root.is_dir():
            raise DeltaError(f"{self.root} ({role}): not a directory (expected an HF-format Qwen checkpoint)")
        try:
            self.config = QwenConfig.from_hf(self.root / "config.json")
        except ConfigError as e:
            raise DeltaError(f"{role}: {e}") from None
        self.raw_config = read_json(self.root / "config.json", DeltaError, dict)
        if self.raw_config.get("quantization_config"):
            # Packed 4-bit weights are not numbers one can add; deltas need the 16-bit weights.
            raise DeltaError(
                f"{self.root / 'config.json'} ({role}): quantization_config is set; weight deltas need "
                f"16/32-bit weights (merge or dequantise the model to bf16 first)"
            )
        try:
            self.files = checkpoint_files(self.root)
        except CheckpointError as e:
            raise DeltaError(f"{role}: {e}") from None
        self.has_index = (self.root / SAFE_INDEX).exists()
        self.tied = bool(self.config.tie_word_embeddings)
        self.manifest = self._read_manifest()
        # key -> TensorInfo, in file order and, inside a file, in data order (sequential reads).
        self.tensors: dict[str, TensorInfo] = {}
        self.slices: dict[str, FileSlice] = {}
        self.file_keys: dict[Path, list[str]] = {}
        for file in self.files:
            keys = []
            for key, piece in file_slices(file).items():   # header checked, in data order
                if key.endswith("rotary_emb.inv_freq"):
                    continue  # a recomputed buffer some old exports carry; never part of a delta
                if key in self.tensors:
                    raise DeltaError(f"{file} ({role}): tensor {key!r} also appears in {self.tensors[key].file}")
                self.tensors[key] = TensorInfo(file, ST_DTYPES[piece.dtype], tuple(piece.shape))
                self.slices[key] = piece
                keys.append(key)
            self.file_keys[file] = keys
        if not self.tied and EMBED in self.tensors and HEAD not in self.tensors:
            raise DeltaError(
                f"{self.root} ({role}): tensor {HEAD!r} is missing and config.json says tie_word_embeddings=false"
            )

    def _read_manifest(self) -> Optional[dict]:
        path = self.root / MANIFEST
        if not path.exists():
            return None
        try:
            return read_json(path, DeltaError)
        except DeltaError as e:
            raise DeltaError(f"{e} ({self.role})") from None

    @property
    def is_delta(self) -> bool:
        """True for directories written by `diff` / `task_arithmetic` without a base (weights are differences)."""
        return bool(self.manifest) and self.manifest.get("tool") == "lora.delta" and self.manifest.get("output") == "delta"

    def describe(self) -> str:
        return f"{self.role} ({self.root})"

    # ------------------------------------------------------------------ keys
    def unique_keys(self) -> list[str]:
        """Tensor names over unique storage: a tied checkpoint's (redundant) lm_head is left out."""
        return [k for k in self.tensors if not (self.tied and k == HEAD)]

    def source_key(self, key: str) -> str:
        """The stored tensor that holds `key`'s values (tied: lm_head is the embedding)."""
        if self.tied and key == HEAD:
            return EMBED
        return key

    def info(self, key: str) -> TensorInfo:
        src = self.source_key(key)
        if src not in self.tensors:
            raise DeltaError(f"{self.describe()}: tensor {key!r} is missing")
        return self.tensors[src]

    # ------------------------------------------------------------------ data
    def read(self, key: str, start: Optional[int] = None, stop: Optional[int] = None) -> torch.Tensor:
        """Rows [start, stop) of tensor `key` (all of it when start is None), in its stored dtype.

        Only those rows' bytes are read (a plain read of the shard, opened for this read only).
        """
        info = self.info(key)
        src = self.source_key(key)
        try:
            if start is None or len(info.shape) == 0:
                return self.slices[src].read()
            return self.slices[src].read(start, stop)
        except (CheckpointError, OSError) as e:  # a truncated data section
            raise DeltaError(f"{info.file} ({self.role}): tensor {src!r} cannot be read ({e})") from None

    def weight_hashes(self) -> dict[str, str]:
        """sha256 of every weight file, by file name."""
        return {f.name: sha256_file(f) for f in self.files}


# ---------------------------------------------------------------------- output directories
def check_output_path(out: Path, inputs: Iterable[ModelFolder], overwrite: bool) -> None:
    """Refuse an output that is, contains or lies in an input (inputs are never modified),
    and an existing output unless `overwrite`."""
    target = out.resolve()
    for ck in inputs:
        src = ck.root.resolve()
        if target == src or src in target.parents or target in src.parents:
            raise DeltaError(f"--out {out}: overlaps input {ck.describe()}; inputs are never modified in place")
    entries = [p for p in out.iterdir() if p.name not in OWNER_FILES] if out.is_dir() else []
    if out.exists() and not out.is_dir():
        raise DeltaError(f"--out {out}: exists and is not a directory")
    if entries and not overwrite:
        raise DeltaError(f"--out {out}: already exists (pass overwrite=True / --overwrite to replace it)")
    if entries and not _written_here(out):
        raise DeltaError(f"--out {out}: holds {entries[0].name!r} and no manifest.json of lora.delta: only a folder "
                         "these tools wrote is replaced; nothing was deleted")


def _written_here(out: Path) -> bool:
    """Whether `out` is an output of these tools (a manifest.json of lora.delta, or the report of
    an extracted adapter)."""
    if (out / "extraction_report.json").is_file() and (out / "adapter_config.json").is_file():
        return True
    try:
        return read_json(out / MANIFEST, DeltaError, dict).get("tool") == "lora.delta"
    except (OSError, DeltaError):
        return False


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
