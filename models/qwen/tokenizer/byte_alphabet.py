"""GPT-2's byte-level alphabet: the reversible byte <-> printable character map that
``vocab.json``, ``merges.txt`` and ``tokenizer.json`` spell BPE tokens in.

    token_to_unicode(b" world") == "Ġworld";  unicode_to_token("Ġworld", where) == b" world"

tiktoken (``qwen.tiktoken``) stores the raw bytes instead, so converting between the two file
families is this map applied per byte.
"""

from __future__ import annotations

import functools
from typing import Dict

from .errors import TokenizerError


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's map byte -> printable unicode character (printable Latin-1 bytes map to themselves)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


@functools.lru_cache(maxsize=1)
def unicode_to_bytes() -> Dict[str, int]:
    """The inverse of `bytes_to_unicode`."""
    return {c: b for b, c in bytes_to_unicode().items()}


def token_to_unicode(token: bytes) -> str:
    """Raw token bytes -> its vocab.json spelling (e.g. b' world' -> 'Ġworld')."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def unicode_to_token(text: str, where: str) -> bytes:
    """vocab.json spelling -> raw token bytes; `where` names the file/line for errors."""
    table = unicode_to_bytes()
    try:
        return bytes(table[c] for c in text)
    except KeyError as e:
        raise TokenizerError(f"{where}: token {text!r} has character {e.args[0]!r} outside the byte-level alphabet") from None
