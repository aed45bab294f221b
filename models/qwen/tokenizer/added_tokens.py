"""Added tokens: the tokens outside the BPE ranks, how they are read from HF files, and how
they are found in text.

Two kinds, by HF's ``special`` flag:

* control tokens (special=True: ``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>``, ...) are
  split out of text only when the caller allows it (``encode(text, allowed_special=...)``), so
  a user typing ``"<|im_end|>"`` cannot end a turn;
* text tokens (special=False: Qwen2.5's ``<tool_call>`` and ``<|fim_prefix|>`` family, Qwen3's
  ``<think>`` and ``<tool_response>``, and the vocabulary extensions of ``data.vocab``) are
  part of the text: every encode matches them, as transformers' tokenizer does.

Matching follows HF tokenizers' AddedVocabulary: tokens with ``normalized=False`` are found in
the raw text first; the text between them is NFC-normalised; then tokens with
``normalized=True`` are found in that; what is left goes to BPE. Each stage is
leftmost-longest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Optional, Tuple, Union

from .errors import TokenizerError


@dataclass(frozen=True)
class AddedToken:
    """A token outside the BPE ranks. `special` and `normalized` are HF's flags."""

    id: int
    content: str
    special: bool = True
    normalized: bool = False

    @property
    def is_text(self) -> bool:
        """A text token: matched in every encode (special=False)."""
        return not self.special


# ---------------------------------------------------------------------- reading HF files
def token_content(value: Any, where: str) -> Optional[str]:
    """tokenizer_config.json writes a token as "text" or {"content": "text", ...}."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"{where}: expected a token string or {{'content': ...}}, got {value!r:.60}")


def added_from_config(config: dict, where: str) -> List[AddedToken]:
    """The ``added_tokens_decoder`` of tokenizer_config.json (id -> token dict)."""
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise TokenizerError(f"{where}: 'added_tokens_decoder' must be an object id -> token")
    out = []
    for key, value in decoder.items():
        try:
            idx = int(key)
        except ValueError:
            raise TokenizerError(f"{where}: added_tokens_decoder key {key!r} is not an integer id") from None
        content = token_content(value, f"{where}: added_tokens_decoder[{key}]")
        special = bool(value.get("special", True)) if isinstance(value, dict) else True
        normalized = bool(value.get("normalized", False)) if isinstance(value, dict) else False
        out.append(AddedToken(idx, content, special, normalized))
    return out


def added_from_tokenizer_json(items: Any, where: str) -> List[AddedToken]:
    """The ``added_tokens`` list of tokenizer.json."""
    if not isinstance(items, list):
        raise TokenizerError(f"{where}: 'added_tokens' must be a list")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("id"), int) or not isinstance(item.get("content"), str):
            raise TokenizerError(f"{where}: added_tokens[{i}] needs an integer 'id' and a string 'content'")
        out.append(AddedToken(item["id"], item["content"], bool(item.get("special", True)), bool(item.get("normalized", False))))
    return out


def merge_added(first: List[AddedToken], second: List[AddedToken], where: str) -> List[AddedToken]:
    """Union by id of two lists of added tokens (the first wins); the same id must be the same text."""
    by_id = {t.id: t for t in first}
    for t in second:
        if t.id in by_id and by_id[t.id].content != t.content:
            raise TokenizerError(f"{where}: id {t.id} is {t.content!r} here but {by_id[t.id].content!r} elsewhere")
        by_id.setdefault(t.id, t)
    return sorted(by_id.values(), key=lambda t: t.id)


# ---------------------------------------------------------------------- finding them in text
def literal_regex(literals: Iterable[str]) -> Optional["re.Pattern[str]"]:
    """A regex matching any of `literals`, leftmost-longest (HF's added-token matching)."""
    # At each position Python's re tries alternatives in order: longest first = longest match.
    ordered = sorted(set(literals), key=lambda t: (-len(t), t))
    return re.compile("|".join(re.escape(t) for t in ordered)) if ordered else None


Span = Tuple[Union[str, int], int, int]  # (text or token id, start, end) in the searched string


def split_literals(text: str, regex: Optional["re.Pattern[str]"], ids: Dict[str, int]) -> List[Span]:
    """`text` as ordinary-text pieces and the ids of the literals `regex` finds, with their spans."""
    if regex is None:
        return [(text, 0, len(text))] if text else []
    out: List[Span] = []
    pos = 0
    for m in regex.finditer(text):
        if m.start() > pos:
            out.append((text[pos:m.start()], pos, m.start()))
        out.append((ids[m.group()], m.start(), m.end()))
        pos = m.end()
    if pos < len(text):
        out.append((text[pos:], pos, len(text)))
    return out


class AddedTokenMatcher:
    """Finds added tokens in text as HF's tokenizers do (see the module docstring).

    `allowed` (a frozenset of control-token strings) says which control tokens count; text
    tokens always do.
    """

    def __init__(self, tokens: Iterable[AddedToken]):
        tokens = list(tokens)
        self.ids = {t.content: t.id for t in tokens}
        self.controls = frozenset(t.content for t in tokens if t.special)
        self._raw = {t.content for t in tokens if not t.normalized}  # matched before normalisation
        self._texts = frozenset(t.content for t in tokens if not t.special)
        self._stages: Dict[Tuple[bool, FrozenSet[str]], Tuple[Tuple[str, ...], Optional["re.Pattern[str]"]]] = {}

    def _stage(self, raw_stage: bool, allowed: FrozenSet[str]):
        """(the literals this stage looks for, their regex)."""
        key = (raw_stage, allowed)
        if key not in self._stages:
            active = self._texts | (allowed & self.controls)
            literals = tuple(sorted(t for t in active if (t in self._raw) == raw_stage))
            self._stages[key] = (literals, literal_regex(literals))
        return self._stages[key]

    def _split(self, text: str, raw_stage: bool, allowed: FrozenSet[str]) -> List[Span]:
        literals, regex = self._stage(raw_stage, allowed)
        # Most text holds none of a few literals: `in` (C substring search) is ~20x faster than
        # scanning with the alternation regex, and CPT encodes gigabytes through here.
        if len(literals) <= 64 and not any(t in text for t in literals):
            return [(text, 0, len(text))] if text else []
        return split_literals(text, regex, self.ids)

    def split_raw(self, text: str, allowed: FrozenSet[str] = frozenset()) -> List[Span]:
        """Stage 1: the tokens with normalized=False, found in the raw text."""
        return self._split(text, True, allowed)

    def split_normalized(self, text: str, allowed: FrozenSet[str] = frozenset()) -> List[Span]:
        """Stage 2: the tokens with normalized=True, found in already-normalised text."""
        return self._split(text, False, allowed)

    def split(self, text: str, normalize: Callable[[str], str], allowed: FrozenSet[str] = frozenset()) -> List[Union[str, int]]:
        """Both stages: normalised text pieces (for BPE) and token ids, in order."""
        out: List[Union[str, int]] = []
        for piece, _, _ in self.split_raw(text, allowed):
            if isinstance(piece, int):
                out.append(piece)
                continue
            out.extend(p for p, _, _ in self.split_normalized(normalize(piece), allowed))
        return out
