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
