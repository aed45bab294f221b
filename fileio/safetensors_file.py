"""safetensors files: the one reader and the one writer of the library.

    header, data_start = read_header(file, fh)        # checked as the format requires
    for key, tensor in read_tensors(file): ...       # streaming: one tensor's memory at a time
    tensors = load_tensors(file)                     # the whole file as {name: tensor}
    rows = file_slices(file)[name].read(0, 128)      # rows of one tensor, read by name
    write_tensors(tensors, file, metadata={"format": "pt"})
    with SafetensorsWriter(file, [(name, dtype, shape), ...]) as w:
        w.write(name, rows); ...                     # tensors arriving in order, rows at a time

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length
N, N bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__"?},
then the data. The header is refused, with the file and tensor named, unless every dtype is
known, every shape is a list of non-negative ints, each tensor's byte range matches its shape,
and the ranges tile the data exactly: sorted by begin they start at 0, each starts where the
previous ended (no gap, no overlap, no two tensors on the same bytes) and the last ends at the
end of the file. That is what the safetensors library itself checks.

Reads are plain file reads into each tensor's own buffer, never a memory map: with mmap, every
page a loader touches stays resident until the file is closed, so a one-file 3 GB checkpoint
cost 3 GB of RSS even when loading it to 4 bits (benchmarks/nf4_load.py: peak 121% -> 54% of
the bf16 size). Writes go to a hidden sibling renamed into place when complete (a reader never
sees half a file) and get the permissions a plain open() would give.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional, Sequence, Union

import torch

from .atomic import file_mode
from .errors import CheckpointError
from .safe_load import loads_json

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
MAX_HEADER = 100_000_000   # the safetensors library's limit


def read_header(file: Path, fh) -> tuple[dict, int]:
    """The checked header of an open safetensors file (or bytes stream): ({name: entry}, offset of
    the data)."""
    size = fh.seek(0, os.SEEK_END)
    fh.seek(0)
    head = fh.read(8)
    if len(head) != 8:
        raise CheckpointError(f"{file}: not a safetensors file (shorter than its 8-byte header length)")
    n = int.from_bytes(head, "little")
    if n <= 0 or n > MAX_HEADER or 8 + n > size:
        raise CheckpointError(f"{file}: not a readable safetensors file (header length {n}, file size {size})")
    try:
        header = loads_json(fh.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file (bad JSON header: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: not a readable safetensors file (the header is not a JSON object)")
    header.pop("__metadata__", None)
    ranges = []
    for key, info in header.items():
        try:
            dtype_name, shape = info["dtype"], info["shape"]
            begin, end = info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: tensor {key!r} has a malformed header entry {info!r}") from None
        if dtype_name not in DTYPES:
            raise CheckpointError(f"{file}: tensor {key!r} has dtype {dtype_name!r}, expected one of {sorted(DTYPES)}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise CheckpointError(f"{file}: tensor {key!r} has shape {shape!r}, expected a list of integers >= 0")
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (begin, end)) or not 0 <= begin <= end:
            raise CheckpointError(f"{file}: tensor {key!r} has data_offsets {info['data_offsets']!r}")
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * torch.empty((), dtype=DTYPES[dtype_name]).element_size():
            raise CheckpointError(f"{file}: tensor {key!r}: data {begin}..{end} does not fit its shape {shape} "
                                  f"of {dtype_name}")
        ranges.append((begin, end, key))
    position = 0
    for begin, end, key in sorted(ranges):
        if begin != position:
            what = "overlaps the tensor before it" if begin < position else f"leaves a gap at byte {position}"
            raise CheckpointError(f"{file}: tensor {key!r} (bytes {begin}..{end}) {what}: not a valid safetensors file")
        position = end
    if 8 + n + position != size:
        raise CheckpointError(f"{file}: the tensors end at byte {8 + n + position} but the file has {size} bytes "
                              "(truncated or padded): not a valid safetensors file")
    return header, 8 + n


DTYPE_CODES = {v: k for k, v in DTYPES.items()}
_COPY_CHUNK = 8 << 20  # bytes copied at a time from a source file (the streamed tensors' only buffer)
PathLike = Union[str, os.PathLike]


def _read_into(fh, tensor: torch.Tensor, offset: int, file, key: str) -> torch.Tensor:
    """Fill `tensor` with the bytes at `offset` of the open file `fh`."""
    if tensor.numel():
        raw = memoryview(tensor.view(-1).view(torch.uint8).numpy())
        fh.seek(offset)
        if fh.readinto(raw) != len(raw):
            raise CheckpointError(f"{file}: tensor {key!r} is truncated")
    return tensor


def _tensors(file, fh, skip: Optional[Callable[[str], bool]]) -> Iterator[tuple[str, Optional[torch.Tensor]]]:
    header, data_start = read_header(file, fh)
    for key in sorted(header):
        if skip is not None and skip(key):
            yield key, None
            continue
        info = header[key]
        tensor = torch.empty(info["shape"], dtype=DTYPES[info["dtype"]])
        yield key, _read_into(fh, tensor, data_start + info["data_offsets"][0], file, key)


def read_tensors(file: Path, skip: Optional[Callable[[str], bool]] = None
                 ) -> Iterator[tuple[str, Optional[torch.Tensor]]]:
    """(key, tensor) one at a time, in sorted key order; (key, None) without reading its bytes
    for a key that `skip` accepts."""
    with open(file, "rb", buffering=0) as fh:
        yield from _tensors(file, fh, skip)


def load_tensors(file: PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (header checked), by name."""
    return dict(read_tensors(Path(file)))


def tensors_from_bytes(blob: bytes, where: str = "<bytes>") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file held in memory (the inverse of `tensors_to_bytes`)."""
    return dict(_tensors(where, io.BytesIO(blob), None))


class FileSlice:
    """A tensor's bytes in a safetensors file (`begin`..`end` of the file): read by rows, or
    copied as they are into another file (never read whole as a tensor)."""

    def __init__(self, file: Path, dtype: str, shape: list, begin: int, end: int, name: str = ""):
        self.file, self.dtype, self.shape, self.begin, self.end = Path(file), dtype, list(shape), begin, end
        self.name = name

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    def read(self, start: Optional[int] = None, stop: Optional[int] = None) -> torch.Tensor:
        """Rows [start, stop) of the tensor (python slice bounds; all of it when both are None):
        shape [rows, *shape[1:]], only those rows' bytes read."""
        shape = list(self.shape)
        offset = self.begin
        if shape and (start is not None or stop is not None):
            rows = range(shape[0])[start:stop]
            row_bytes = self.nbytes // shape[0] if shape[0] else 0
            offset += rows.start * row_bytes if len(rows) else 0
            shape[0] = len(rows)
        tensor = torch.empty(shape, dtype=DTYPES[self.dtype])
        with open(self.file, "rb", buffering=0) as fh:
            return _read_into(fh, tensor, offset, self.file, self.name)

    def copy_to(self, out) -> None:
        buffer = memoryview(bytearray(min(self.nbytes, _COPY_CHUNK)))  # the one buffer, reused
        with open(self.file, "rb", buffering=0) as fh:
            fh.seek(self.begin)
            left = self.nbytes
            while left:
                n = fh.readinto(buffer[: min(left, len(buffer))])
                if not n:
                    raise CheckpointError(f"{self.file}: truncated while copying a tensor out of it")
                out.write(buffer[:n])
                left -= n


def file_slices(file: Path) -> dict[str, FileSlice]:
    """Every tensor of a safetensors file (header checked) as a FileSlice, in data order."""
    with open(file, "rb", buffering=0) as fh:
        header, data_start = read_header(file, fh)
    entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    return {k: FileSlice(file, e["dtype"], e["shape"], data_start + e["data_offsets"][0],
                         data_start + e["data_offsets"][1], k) for k, e in entries}


def entry_nbytes(value: Union[torch.Tensor, FileSlice]) -> int:
    return value.nbytes if isinstance(value, FileSlice) else value.numel() * value.element_size()


def _code(dtype: Union[torch.dtype, str], where, name: str) -> str:
    code = dtype if isinstance(dtype, str) else DTYPE_CODES.get(dtype)
    if code not in DTYPES:
        raise ValueError(f"{where}: tensor {name!r} has dtype {dtype}, expected one of {sorted(DTYPES)}")
    return code


class SafetensorsWriter:
    """The one writer: a safetensors file whose tensors arrive in a declared order, each whole
    or in chunks of rows (`write`), or copied from another file (`copy`).

    entries: [(name, dtype, shape)] in the order the data will be written (dtype: a torch dtype
    or a safetensors code such as "BF16"). The header goes first, so memory is one chunk
    whatever the file's size. `close()` checks that every byte arrived, then renames the file
    into place (a path target: written as a hidden sibling until then; fsync=True flushes it to
    disk first); after an exception (`with` block, `abort()`) the partial file is deleted.
    target may also be an open binary stream (written in place, not closed).
    """

    def __init__(self, target: Union[PathLike, BinaryIO], entries: Sequence[tuple[str, Union[torch.dtype, str], Sequence[int]]],
                 metadata: Optional[dict[str, str]] = None, fsync: bool = False):
        self.stream = None if isinstance(target, (str, os.PathLike)) else target
        self.path = None if self.stream is not None else Path(target)
        self.fsync = fsync
        self.entries = [(name, _code(dtype, target, name), list(shape)) for name, dtype, shape in entries]
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        self.sizes = []
        for name, code, shape in self.entries:
            n = torch.empty((), dtype=DTYPES[code]).element_size()
            for s in shape:
                n *= s
            header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + n]}
            self.sizes.append(n)
            offset += n
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as the safetensors library writes it
        if self.path is not None:
            self.tmp = self.path.parent / f".{self.path.name}.tmp-{os.getpid()}"
            self.f = open(self.tmp, "wb")
        else:
            self.f = self.stream
        self.f.write(len(blob).to_bytes(8, "little"))
        self.f.write(blob)
        self.index = 0    # current entry
        self.written = 0  # bytes of the current entry so far

    def _next(self, name: str, dtype: str) -> int:
        """Index of the entry `name` (skipping empty tensors before it), checked to be next."""
        while self.index < len(self.entries) and self.sizes[self.index] == 0 and self.entries[self.index][0] != name:
            self.index += 1  # empty tensors have no bytes to wait for
        if self.index >= len(self.entries):
            raise RuntimeError(f"{self._where()}: write of {name!r} after the last tensor")
        want, code, _ = self.entries[self.index]
        if name != want or dtype != code:
            raise RuntimeError(f"{self._where()}: expected {want!r} ({DTYPES[code]}), got {name!r} "
                               f"({DTYPES.get(dtype, dtype)})")
        return self.sizes[self.index]

    def _advance(self, n: int, name: str) -> None:
        self.written += n
        if self.written > self.sizes[self.index]:
            raise RuntimeError(f"{self._where()}: too many bytes for {name!r}")
        if self.written == self.sizes[self.index]:
            self.index += 1
            self.written = 0

    def write(self, name: str, rows: torch.Tensor) -> None:
        """The next rows (or all) of the current tensor `name`, in its declared dtype."""
        self._next(name, DTYPE_CODES.get(rows.dtype, str(rows.dtype)))
        data = rows.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self.f.write(memoryview(data))
        self._advance(data.nbytes, name)

    def copy(self, name: str, source: FileSlice) -> None:
        """The whole tensor `name`, copied byte for byte from another file."""
        self._next(name, source.dtype)
        source.copy_to(self.f)
        self._advance(source.nbytes, name)

    def _where(self):
        return self.path if self.path is not None else "<stream>"

    def close(self) -> None:
        while self.index < len(self.entries) and self.sizes[self.index] == 0:
            self.index += 1
        complete = self.index == len(self.entries)
        if self.path is None:
            if not complete:
                raise RuntimeError(f"{self._where()}: closed before {self.entries[self.index][0]!r} was written")
            return
        self.f.flush()
        if self.fsync:
            os.fsync(self.f.fileno())
        self.f.close()
        if not complete:
            self.tmp.unlink(missing_ok=True)
            raise RuntimeError(f"{self.path}: closed before {self.entries[self.index][0]!r} was written")
        os.chmod(self.tmp, file_mode())
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Drop a partial file (a path target)."""
        if self.path is not None:
            self.f.close()
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, kind, error, tb) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


def write_streamed(entries: dict[str, Union[torch.Tensor, FileSlice]], path: Union[PathLike, BinaryIO],
                   metadata: Optional[dict[str, str]] = None) -> None:
    """A safetensors file of in-memory tensors and FileSlices, written one tensor at a time:
    memory beyond the in-memory tensors is one copy chunk, whatever the slices' sizes."""
    layout = [(name, v.dtype, v.shape) for name, v in entries.items()]
    with SafetensorsWriter(path, layout, metadata) as writer:
        for name, value in entries.items():
            if isinstance(value, FileSlice):
                writer.copy(name, value)
            else:
                writer.write(name, value)


def write_tensors(tensors: dict[str, torch.Tensor], path: Union[PathLike, BinaryIO],
                  metadata: Optional[dict[str, str]] = None) -> None:
    """A safetensors file of in-memory tensors (any device, any layout: written as contiguous
    CPU bytes), with the permissions a plain open() would give.

    Laid out as the safetensors library lays them out: by element size (largest first, so each
    tensor's data is aligned to it), then by name; the file depends on the tensors, not on the
    order of the dict (reading and rewriting a file gives the same bytes)."""
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    write_streamed({k: tensors[k] for k in order}, path, metadata)


def tensors_to_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """A safetensors file in memory (to send between processes; `tensors_from_bytes` reads it)."""
    out = io.BytesIO()
    write_tensors(tensors, out)
    return out.getvalue()
