"""safetensors files: read one tensor at a time with the header checked as the format requires,
and written with the permissions a plain open() would give.

    for key, tensor in read_tensors(file): ...       # streaming: one tensor's memory at a time
    write_tensors(tensors, file, metadata={"format": "pt"})

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length
N, N bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__"?},
then the data. The header is refused, with the file and tensor named, unless every dtype is
known, every shape is a list of non-negative ints, each tensor's byte range matches its shape,
and the ranges tile the data exactly: sorted by begin they start at 0, each starts where the
previous ended (no gap, no overlap, no two tensors on the same bytes) and the last ends at the
end of the file. That is what the safetensors library itself checks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

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
    """The checked header of an open safetensors file: ({name: entry}, offset of the data)."""
    size = os.fstat(fh.fileno()).st_size
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


def read_tensors(file: Path, skip: Optional[Callable[[str], bool]] = None
                 ) -> Iterator[tuple[str, Optional[torch.Tensor]]]:
    """(key, tensor) one at a time, in sorted key order; (key, None) without reading its bytes
    for a key that `skip` accepts.

    Each tensor is read with a plain file read into its own buffer rather than as a view of a
    memory-mapped file: with mmap, every page a loader touches stays resident until the file is
    closed, so a one-file 3 GB checkpoint cost 3 GB of RSS even when loading it to 4 bits
    (benchmarks/nf4_load.py: peak 121% -> 54% of the bf16 size).
    """
    with open(file, "rb", buffering=0) as fh:
        header, data_start = read_header(file, fh)
        for key in sorted(header):
            if skip is not None and skip(key):
                yield key, None
                continue
            info = header[key]
            begin, end = info["data_offsets"]
            tensor = torch.empty(info["shape"], dtype=DTYPES[info["dtype"]])
            if tensor.numel():
                raw = memoryview(tensor.view(-1).view(torch.uint8).numpy())
                fh.seek(data_start + begin)
                if fh.readinto(raw) != end - begin:
                    raise CheckpointError(f"{file}: tensor {key!r} is truncated")
            yield key, tensor


def write_tensors(tensors: dict[str, torch.Tensor], path: Union[str, os.PathLike],
                  metadata: Optional[dict[str, str]] = None) -> None:
    """safetensors.torch.save_file, then the file gets the umask's permissions (the library
    creates it 0o600, which a team sharing --out could not read)."""
    from safetensors.torch import save_file

    save_file(tensors, os.fspath(path), metadata=metadata)
    os.chmod(path, file_mode())


DTYPE_CODES = {v: k for k, v in DTYPES.items()}
_COPY_CHUNK = 8 << 20  # bytes copied at a time from a source file (the streamed tensors' only buffer)


class FileSlice:
    """A tensor's bytes in another safetensors file, copied as they are (never read as a tensor)."""

    def __init__(self, file: Path, dtype: str, shape: list, begin: int, end: int):
        self.file, self.dtype, self.shape, self.begin, self.end = Path(file), dtype, list(shape), begin, end

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

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
    """Every tensor of a safetensors file (header checked) as a FileSlice."""
    with open(file, "rb", buffering=0) as fh:
        header, data_start = read_header(file, fh)
    return {k: FileSlice(file, e["dtype"], e["shape"], data_start + e["data_offsets"][0], data_start + e["data_offsets"][1])
            for k, e in header.items()}


def entry_nbytes(value: Union[torch.Tensor, FileSlice]) -> int:
    return value.nbytes if isinstance(value, FileSlice) else value.numel() * value.element_size()


def write_streamed(entries: dict[str, Union[torch.Tensor, FileSlice]], path: Union[str, os.PathLike],
                   metadata: Optional[dict[str, str]] = None) -> None:
    """A safetensors file of in-memory tensors and FileSlices, written one tensor at a time:
    memory beyond the in-memory tensors is one copy chunk, whatever the slices' sizes."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, value in entries.items():
        if isinstance(value, FileSlice):
            dtype, shape = value.dtype, value.shape
        else:
            dtype, shape = DTYPE_CODES[value.dtype], list(value.shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + entry_nbytes(value)]}
        offset += entry_nbytes(value)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the safetensors library writes it
    with open(path, "wb") as out:
        out.write(len(raw).to_bytes(8, "little"))
        out.write(raw)
        for value in entries.values():
            if isinstance(value, FileSlice):
                value.copy_to(out)
            elif value.numel():
                out.write(memoryview(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
    os.chmod(path, file_mode())
