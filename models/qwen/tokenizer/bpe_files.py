"""Reading and writing the three BPE file formats, as tiktoken ranks {token bytes: id}:

* ``qwen.tiktoken`` (Qwen-7B v1): one ``base64(token) rank`` per line;
* ``tokenizer.json`` (HF tokenizers): ``model.vocab`` / ``model.merges`` + ``added_tokens`` +
  the pre-tokeniser regex and normaliser;
* ``vocab.json`` + ``merges.txt`` (Qwen2's slow tokenizer).

HF files spell tokens in GPT-2's byte alphabet (`byte_alphabet`) and list merges, which must
be in id order (`merges.ranks_from_vocab_merges`).
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from .added_tokens import AddedToken, added_from_tokenizer_json, merge_added
from .byte_alphabet import token_to_unicode
from .engine import file_version
from .errors import TokenizerError
from fileio import safe_load
from .merges import ranks_from_vocab_merges


def read_json(path: Path) -> Any:
    """A JSON file, with errors naming the file and line."""
    return safe_load.read_json(path, TokenizerError)


def write_json(path: Path, obj: Any, indent: Optional[int]) -> None:
    """Write JSON (non-ASCII kept) through a temporary file, so a crash leaves no half file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=indent)
        f.write("\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------- qwen.tiktoken
@functools.lru_cache(maxsize=4)
def _load_tiktoken_cached(version: Tuple[int, int, int, int], path: str) -> Dict[bytes, int]:
    ranks: Dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise TokenizerError(f"{path}:{lineno}: expected '<base64 token> <rank>', got {line[:60]!r}")
            try:
                token = base64.b64decode(parts[0], validate=True)
                rank = int(parts[1])
            except (binascii.Error, ValueError):
                raise TokenizerError(f"{path}:{lineno}: expected '<base64 token> <rank>', got {line[:60]!r}") from None
            if token in ranks:
                raise TokenizerError(f"{path}:{lineno}: token {token!r} listed twice")
            ranks[token] = rank
    if not ranks:
        raise TokenizerError(f"{path}: empty tiktoken file")
    return ranks


def load_tiktoken_ranks(path: Union[str, os.PathLike]) -> Dict[bytes, int]:
    """Read a ``*.tiktoken`` file (base64 token, rank per line) -> {token bytes: rank}."""
    path = os.fspath(path)
    # Keyed by the file's identity, so hard-linked copies of one vocabulary are read once.
    return dict(_load_tiktoken_cached(file_version(Path(path)), path))


def check_vocabulary(ranks: Dict[bytes, int], added_ids: Sequence[int], file: Union[str, os.PathLike]) -> None:
    """Every id below the vocabulary size decodes: the BPE ranks are 0..N-1, every byte is a token
    (byte-level BPE encodes any text), and the added tokens take the ids N, N+1, ... after them
    (a vocabulary cut short or padded would fail at encode or decode time instead)."""
    n = len(ranks)
    ids = sorted(set(ranks.values()))
    if len(ids) != n or ids[0] != 0 or ids[-1] != n - 1:
        gap = next((i for i, r in enumerate(ids) if i != r), len(ids))
        why = "a rank is listed twice" if len(ids) != n else f"rank {gap} is missing"
        raise TokenizerError(f"{file}: the {n} BPE ranks are not 0..{n - 1} ({why})")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(f"{file}: byte 0x{missing[0]:02x} has no token ({len(missing)} of the 256 bytes are "
                             "missing; a byte-level BPE covers them all): the vocabulary is incomplete")
    extra = sorted(set(added_ids))
    if extra and extra != list(range(n, n + len(extra))):
        want = f"ids {n}..{n + len(extra) - 1}"
        raise TokenizerError(f"{file}: {n} BPE tokens, but the {len(extra)} added tokens have ids {extra[0]}.."
                             f"{extra[-1]} (expected {want}): the vocabulary is cut short, or an id is skipped")


def write_tiktoken(path: Path, ranks: Dict[bytes, int]) -> None:
    with open(path, "wb") as f:
        for tok, idx in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(tok) + b" " + str(idx).encode() + b"\n")


# ---------------------------------------------------------------------- vocab.json + merges.txt
def parse_merges_txt(path: Path) -> List[Tuple[str, str]]:
    """merges.txt: an optional '#version' line, then 'a b' per line."""
    merges = []
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line or (lineno == 1 and line.startswith("#version")):
                continue
            parts = line.split(" ")
            if len(parts) != 2 or not parts[0] or not parts[1]:
                raise TokenizerError(f"{path}:{lineno}: expected two tokens separated by one space, got {line[:60]!r}")
            merges.append((parts[0], parts[1]))
    return merges


def read_vocab_merges(vocab_file: Path, merges_file: Path, added: Sequence[AddedToken]) -> Dict[bytes, int]:
    """vocab.json + merges.txt -> ranks (the added tokens' ids are left out of the BPE)."""
    vocab = read_json(vocab_file)
    if not isinstance(vocab, dict):
        raise TokenizerError(f"{vocab_file}: expected a JSON object token -> id")
    added_ids = {t.id for t in added}
    vocab = {k: v for k, v in vocab.items() if v not in added_ids}
    return ranks_from_vocab_merges(vocab, parse_merges_txt(merges_file), f"{vocab_file} + {merges_file.name}")


def write_vocab_merges(out: Path, tokenizer_json: dict) -> None:
    """vocab.json and merges.txt from a tokenizer.json dict (same vocabulary, same merges)."""
    write_json(out / "vocab.json", tokenizer_json["model"]["vocab"], indent=None)
    with open(out / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.write("\n".join(tokenizer_json["model"]["merges"]) + "\n")


# ---------------------------------------------------------------------- tokenizer.json
def _pattern_from_pre_tokenizer(pre: Any) -> Optional[str]:
    """The Split regex of a tokenizer.json pre_tokenizer (Sequence or single), if any."""
    if not isinstance(pre, dict):
        return None
    items = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    for item in items or []:
        if isinstance(item, dict) and item.get("type") == "Split":
            pattern = item.get("pattern") or {}
            if isinstance(pattern, dict) and isinstance(pattern.get("Regex"), str):
                return pattern["Regex"]
    return None


def read_tokenizer_json(file: Path, config_added: List[AddedToken], config_where: str):
    """tokenizer.json -> (ranks, added tokens, pre-tokeniser regex or None, NFC normaliser?).

    Its added tokens are merged with tokenizer_config.json's (`config_added`); the same id must
    name the same token in both.
    """
    data = read_json(file)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise TokenizerError(f"{file}: expected a byte-level BPE model with 'model.vocab' and 'model.merges'")
    added = merge_added(added_from_tokenizer_json(data.get("added_tokens", []), str(file)), config_added, config_where)
    merges = []
    for i, m in enumerate(model.get("merges") or []):
        pair = m.split(" ") if isinstance(m, str) else m
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise TokenizerError(f"{file}: model.merges[{i}] = {m!r:.60}; expected 'a b' or ['a', 'b']")
        merges.append((pair[0], pair[1]))
    added_ids = {t.id for t in added}
    vocab = {k: v for k, v in model["vocab"].items() if v not in added_ids}
    ranks = ranks_from_vocab_merges(vocab, merges, str(file))
    normalizer = data.get("normalizer")
    normalize_nfc = isinstance(normalizer, dict) and normalizer.get("type") == "NFC"
    return ranks, added, _pattern_from_pre_tokenizer(data.get("pre_tokenizer")), normalize_nfc


def tokenizer_json(
    ranks: Dict[bytes, int],
    merges: Sequence[Tuple[bytes, bytes]],
    added: Sequence[AddedToken],
    pattern: str,
    normalize_nfc: bool,
) -> dict:
    """The tokenizer.json dict (HF tokenizers byte-level BPE with Qwen's pre-tokeniser)."""
    vocab = {token_to_unicode(tok): idx for tok, idx in sorted(ranks.items(), key=lambda kv: kv[1])}
    merge_lines = [f"{token_to_unicode(a)} {token_to_unicode(b)}" for a, b in merges]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": t.id, "content": t.content, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": t.normalized, "special": t.special}
            for t in added
        ],
        "normalizer": {"type": "NFC"} if normalize_nfc else None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
            byte_level,
        ]},
        "post_processor": dict(byte_level),
        "decoder": dict(byte_level),
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merge_lines},
    }
