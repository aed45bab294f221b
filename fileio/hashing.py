"""sha256 of a file's bytes, read in blocks (for cache keys and checkpoint manifests).

Python 3.11 has `hashlib.file_digest`; this project still supports 3.10.
"""

from __future__ import annotations

import hashlib
import os


def sha256_file(path: os.PathLike, block: int = 1 << 22) -> str:
    """Hex sha256 of the file at `path` as stored (a .gz file is hashed compressed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(block)
            if not chunk:
                break
            h.update(chunk)
    return h.hexdigest()


SAMPLES = 16
SAMPLE_BYTES = 1 << 16


def sampled_digest(path: os.PathLike, header: bool = False) -> str:
    """Hex sha256 of a large file's size and SAMPLES evenly spaced blocks of SAMPLE_BYTES (~1 MiB
    read, whatever the size): a cheap fingerprint that changes when the file is replaced by other
    content (new weights of the same shapes), not a proof of identity.

    header: the file is a safetensors file whose whole JSON header is hashed too (names, shapes
    and dtypes, however long the header)."""
    h = hashlib.sha256()
    size = os.path.getsize(path)
    h.update(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        if header:
            n = int.from_bytes(f.read(8), "little")
            h.update(f.read(min(n, max(size - 8, 0))))
        step = max(size // SAMPLES, 1)
        for offset in range(0, size, step)[:SAMPLES]:
            f.seek(offset)
            h.update(f.read(SAMPLE_BYTES))
        f.seek(max(size - SAMPLE_BYTES, 0))
        h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()
