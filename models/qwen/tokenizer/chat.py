"""Tokenising a rendered chat as transformers does, and finding the assistant turns in it.

`Tokenizer.apply_chat_template` renders the template (`models/qwen/chat_template.py`), then:

1. Ids (`encode_rendered`). Every added token the template wrote is its id (control and text
   tokens alike), as transformers' tokenizer encodes a rendered chat. Special-token text that
   came from the caller's strings was wrapped in markers before rendering
   (`chat_template.mark_special_text`); those pieces are encoded as plain text, exactly as
   transformers' ``encode_marked_chat`` does for ``sanitize_control_tokens=True`` (each piece
   between markers encoded on its own, after a "\\n" that is then dropped).

2. The assistant mask (`assistant_spans`, `mask_of`), the one owner of which tokens are
   assistant tokens (data/sft.py only turns this mask into labels). Method: the ChatML
   structure of the rendered text, read from the control-token ids (so text typed by a user is
   never mistaken for structure). Every ``<|im_start|>ROLE\\n ... <|im_end|>`` is a turn; a
   turn whose role line is exactly ``assistant`` is an assistant turn, and its span runs from
   after the role line through its ``<|im_end|>``: the whole turn as rendered (Qwen3's think
   block, tool calls) and nothing else. The number of such turns must equal the number of
   assistant messages, turns may not nest or be left open (except the generation prompt), and
   any other shape is an error: a template whose structure does not show the assistant turns is
   refused rather than guessed at. A token is supervised when it overlaps a span, the rule
   transformers uses for ``{% generation %}`` spans.
"""

from __future__ import annotations

import unicodedata
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from itertools import accumulate
from typing import FrozenSet, List, Optional, Sequence, Tuple

from ..chat_template import ChatTemplateError, marker_regex


@dataclass
class Run:
    """Ids encoded from one stretch [start, end) of the rendered chat.

    text: the raw text of the stretch (None when the run is one added token found in raw text).
    normalized: `text` after NFC; bounds: each id's byte range inside `normalized`.
    A run encoded after a prepended "\\n" starts one character early and its text includes
    that "\\n" (whose token is dropped); only the byte ranges of the kept ids matter.
    """

    start: int
    end: int
    ids: List[int]
    text: Optional[str] = None
    normalized: Optional[str] = None
    bounds: List[Tuple[int, int]] = field(default_factory=list)


def encode_runs(tok, text: str, base: int, allowed: FrozenSet[str]) -> List[Run]:
    """`tok.encode(text)` (control tokens in `allowed` split out) as runs at offset `base`."""
    runs: List[Run] = []
    for piece, start, end in tok.matcher.split_raw(text, allowed):
        if isinstance(piece, int):
            runs.append(Run(base + start, base + end, [piece]))
            continue
        normalized = tok.normalize(piece)
        run = Run(base + start, base + end, [], piece, normalized)
        for sub, _, _ in tok.matcher.split_normalized(normalized, allowed):
            run.ids.extend([sub] if isinstance(sub, int) else tok.bpe.encode_ordinary(sub))
        ends = list(accumulate(tok.token_lengths(run.ids)))
        run.bounds = list(zip([0] + ends[:-1], ends))
        runs.append(run)
    return runs


def _drop_first(runs: List[Run], count: int) -> List[Run]:
    """`runs` without their first `count` ids (the prepended newline)."""
    out = []
    for run in runs:
        if count and run.ids:
            k = min(count, len(run.ids))
            count -= k
            run = Run(run.start, run.end, run.ids[k:], run.text, run.normalized, run.bounds[k:])
        if run.ids:
            out.append(run)
    return out


def _encode_after_newline(tok, piece: str, start: int, allowed: FrozenSet[str]) -> List[Run]:
    """transformers' _encode_chat_piece: encode "\\n" + piece and drop the newline's ids if they lead."""
    newline = tok.encode("\n")
    runs = encode_runs(tok, "\n" + piece, start - 1, allowed)
    ids = [i for r in runs for i in r.ids]
    if ids[: len(newline)] == newline:
        return _drop_first(runs, len(newline))
    return encode_runs(tok, piece, start, allowed)


def encode_rendered(tok, rendered: str, marked: bool) -> List[Run]:
    """The ids of a rendered chat as runs; `marked`: special-token text from inputs carries markers."""
    controls = frozenset(tok.control_tokens)
    if not marked:
        return encode_runs(tok, rendered, 0, controls)
    runs: List[Run] = []
    pos, first = 0, True
    for m in marker_regex(tuple(tok.special_tokens)).finditer(rendered):
        if m.start() > pos:
            text = rendered[pos:m.start()]
            runs += encode_runs(tok, text, pos, controls) if first else _encode_after_newline(tok, text, pos, controls)
        first = False  # transformers encodes only the first piece without the newline trick
        if m.group(1) is not None:  # a marked token: as plain text
            token = m.group(1)
            piece = _encode_after_newline(tok, token, m.start(1), frozenset())
            if tok.special_tokens[token] in [i for r in piece for i in r.ids]:
                raise ChatTemplateError(f"cannot encode {token!r} as text: the tokenizer produces it from plain text")
            runs += piece
        pos = m.end()
    if pos < len(rendered):
        text = rendered[pos:]
        runs += encode_runs(tok, text, pos, controls) if first else _encode_after_newline(tok, text, pos, controls)
    return runs


def assistant_spans(tok, rendered: str, runs: Sequence[Run], n_assistant: int, generation_prompt: bool,
                    source: str) -> List[Tuple[int, int]]:
    """Character spans [start, end) of the assistant turns (see the module docstring)."""
    def refuse(why: str) -> ChatTemplateError:
        return ChatTemplateError(
            f"{source}: cannot find the assistant turns for the label mask: {why} (assistant masks need every "
            "assistant message rendered as one '<|im_start|>assistant\\n ... <|im_end|>' turn)")

    start_id, end_id = tok.im_start_id, tok.im_end_id
    marks = []
    for run in runs:
        if run.text is None and run.ids[0] in (start_id, end_id):
            marks.append((run.ids[0], run.start, run.end))
        elif run.text is not None and (start_id in run.ids or end_id in run.ids):
            raise refuse("a turn marker is matched after normalisation")
    spans: List[Tuple[int, int]] = []
    open_turn: Optional[Tuple[int, str, int]] = None  # (char position, role, content start)
    for k, (token, start, end) in enumerate(marks):
        if token == start_id:
            if open_turn is not None:
                raise refuse(f"<|im_start|> at character {start} inside the turn opened at {open_turn[0]}")
            limit = marks[k + 1][1] if k + 1 < len(marks) else len(rendered)
            newline = rendered.find("\n", end, limit)
            if newline < 0:
                if k + 1 == len(marks) and generation_prompt:
                    open_turn = (start, rendered[end:], len(rendered))
                    continue
                raise refuse(f"the turn at character {start} has no role line")
            open_turn = (start, rendered[end:newline], newline + 1)
        else:
            if open_turn is None:
                raise refuse(f"<|im_end|> at character {start} outside any turn")
            if open_turn[1] == "assistant":
                spans.append((open_turn[2], end))
            open_turn = None
    if open_turn is not None and not (generation_prompt and open_turn[1] == "assistant"):
        raise refuse(f"the turn opened at character {open_turn[0]} is never closed")
    if len(spans) != n_assistant:
        raise refuse(f"{len(spans)} assistant turns rendered for {n_assistant} assistant messages")
    return spans


def _byte_offset(run: Run, char: int) -> int:
    """Byte offset in `run.normalized` of raw character offset `char` (at a turn boundary)."""
    raw = run.text[:char]
    if run.normalized is not run.text and run.normalized != run.text:
        raw = unicodedata.normalize("NFC", raw)
    return len(raw.encode("utf-8"))


def mask_of(runs: Sequence[Run], spans: Sequence[Tuple[int, int]]) -> List[int]:
    """1 for every id whose text overlaps a span, else 0 (one entry per id of `runs`)."""
    mask: List[int] = []
    for run in runs:
        inside = [(s, e) for s, e in spans if s < run.end and e > run.start]
        if not inside or run.text is None:
            mask.extend([int(bool(inside))] * len(run.ids))
            continue
        if any(s <= run.start and e >= run.end for s, e in inside):  # the whole run is in a turn
            mask.extend([1] * len(run.ids))
            continue
        starts = [lo for lo, _ in run.bounds]
        ends = [hi for _, hi in run.bounds]
        flags = [0] * len(run.ids)
        for s, e in inside:
            a = _byte_offset(run, max(s, run.start) - run.start)
            b = _byte_offset(run, min(e, run.end) - run.start)
            # tokens overlapping [a, b): from the first one ending after a to the last one starting before b
            first, stop = bisect_right(ends, a), bisect_left(starts, b)
            flags[first:stop] = [1] * max(0, stop - first)
        mask.extend(flags)
    return mask
