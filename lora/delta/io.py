"""Streaming checkpoint I/O for weight deltas: read row ranges of one tensor at a time from
memory-mapped safetensors shards, and write output shards tensor by tensor as they are computed.

Why not `safetensors.torch.save_file`: it needs a whole shard in memory (a 1.5B model saved
with max_shard_size="5GB" is one 3 GB shard). The safetensors layout is simple enough to
stream: 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}}, padded with spaces to a multiple of 8, then the tensors' bytes back to back.
We know every output shape and dtype before computing anything, so the header goes first and
the data follows chunk by chunk.

Why reopen a shard for every read: pages of a memory-mapped file that were touched count in
the process's resident set until the map is closed. Opening the file per row chunk keeps the
resident set at one chunk, whatever the size of the checkpoint.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
from safetensors import safe_open

from models.qwen import CheckpointError, ConfigError, QwenConfig
from models.qwen.checkpoint import SAFE_INDEX, checkpoint_files
from fileio.atomic import OWNER_FILES
from fileio.folder import FOLDER_FILES
from fileio.hashing import sha256_file
from fileio.safe_load import loads_json, read_json
from fileio.safetensors_file import DTYPES as ST_DTYPES

EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"
MANIFEST = "manifest.json"

ST_NAMES = {v: k for k, v in ST_DTYPES.items()}

PathLike = Union[str, os.PathLike]


class DeltaError(ValueError):
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


def read_header(file: Path) -> dict:
    """The JSON header of a safetensors file: {name: {dtype, shape, data_offsets}} (+ __metadata__)."""
    try:
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:
                raise ValueError(f"header length {n} is implausible")
            header = loads_json(f.read(n))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: safetensors header is not a JSON object")
    return header


class Checkpoint:
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
        self.file_keys: dict[Path, list[str]] = {}
        for file in self.files:
            header = read_header(file)
            entries = sorted(
                ((k, v) for k, v in header.items() if k != "__metadata__"),
                key=lambda kv: kv[1].get("data_offsets", [0])[0],
            )
            keys = []
            for key, meta in entries:
                if key.endswith("rotary_emb.inv_freq"):
                    continue  # a recomputed buffer some old exports carry; never part of a delta
                if key in self.tensors:
                    raise DeltaError(f"{file} ({role}): tensor {key!r} also appears in {self.tensors[key].file}")
                if meta.get("dtype") not in ST_DTYPES:
                    raise DeltaError(f"{file} ({role}): tensor {key!r} has unsupported dtype {meta.get('dtype')!r}")
                self.tensors[key] = TensorInfo(file, ST_DTYPES[meta["dtype"]], tuple(meta["shape"]))
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

        The shard is opened for this read only, so the mapped pages leave the resident set
        as soon as the rows are copied out.
        """
        info = self.info(key)
        src = self.source_key(key)
        try:
            with safe_open(str(info.file), framework="pt", device="cpu") as f:
                if start is None or len(info.shape) == 0:
                    return f.get_tensor(src)
                return f.get_slice(src)[start:stop]
        except Exception as e:  # a truncated or corrupt data section
            raise DeltaError(f"{info.file} ({self.role}): tensor {src!r} cannot be read ({e})") from None

    def weight_hashes(self) -> dict[str, str]:
        """sha256 of every weight file, by file name."""
        return {f.name: sha256_file(f) for f in self.files}


class SafetensorsStreamWriter:
    """Write one safetensors file whose tensors arrive in order, in chunks of rows.

    entries: [(name, dtype, shape)] in the order the data will be written. `write(name, rows)`
    appends the next rows of the current tensor; `close()` checks that every byte arrived.
    """

    def __init__(self, path: Path, entries: list[tuple[str, torch.dtype, tuple]], metadata: Optional[dict] = None):
        self.path = path
        self.entries = entries
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        self.sizes = []
        for name, dtype, shape in entries:
            n = torch.empty((), dtype=dtype).element_size()
            for s in shape:
                n *= s
            header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            self.sizes.append(n)
            offset += n
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
        self.f = open(path, "wb")
        self.f.write(struct.pack("<Q", len(blob)))
        self.f.write(blob)
        self.index = 0  # current entry
        self.written = 0  # bytes of the current entry so far

    def write(self, name: str, rows: torch.Tensor) -> None:
        if self.index >= len(self.entries):
            raise RuntimeError(f"{self.path}: write of {name!r} after the last tensor")
        want, dtype, _ = self.entries[self.index]
        if name != want or rows.dtype != dtype:
            raise RuntimeError(f"{self.path}: expected {want!r} ({dtype}), got {name!r} ({rows.dtype})")
        data = rows.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self.f.write(memoryview(data))
        self.written += data.nbytes
        if self.written > self.sizes[self.index]:
            raise RuntimeError(f"{self.path}: too many bytes for {name!r}")
        if self.written == self.sizes[self.index]:
            self.index += 1
            self.written = 0
            while self.index < len(self.entries) and self.sizes[self.index] == 0:
                self.index += 1  # empty tensors have no bytes to wait for

    def close(self) -> None:
        complete = self.index == len(self.entries)
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        if not complete:
            raise RuntimeError(f"{self.path}: closed before {self.entries[self.index][0]!r} was written")


# ---------------------------------------------------------------------- output directories
TOKENIZER_FILES = FOLDER_FILES  # what travels with a model folder (tokenizer and processor files)


def check_output_path(out: Path, inputs: Iterable[Checkpoint], overwrite: bool) -> None:
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
