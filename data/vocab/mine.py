"""Mining domain tokens: sentencepiece proposes candidates, the Qwen tokenizer measures them.

    report = mine_tokens(texts, tok, max_tokens=32)    # MiningReport
    print(report.table())                              # token, frequency, Qwen pieces before, saving
    report.tokenizer                                   # tok.with_added_tokens(report.tokens)
    report = measure_tokens(texts, tok, ["数据库系统"])  # the same report for a list of your own

1. A sentencepiece model (unigram or BPE) is trained on the corpus; its pieces are the
   candidates, with "▁" read as a leading space (" getaddrinfo" then matches after a space,
   as Qwen's own word tokens do) and each also without it (Chinese text has no spaces).
2. A candidate must contain a letter, not be a Qwen token already, pass the tokenizer's
   checks (`Tokenizer.check_new_token`), occur at least `min_frequency` times, and not be
   "word" when " word" is a Qwen token (matched first, it would split that trained token
   into " " + "word" wherever it occurs); one that starts with a lower-case letter must
   mostly start words (not "nvalidStateError", the tail of "InvalidStateError"). Candidates
   are ranked by the Qwen tokens one occurrence saves (its Qwen pieces - 1; rank="saving":
   by occurrences x that).
3. In that order each candidate is *measured*: the documents containing it are re-tokenised
   by the extended tokenizer (the accepted tokens plus this one, matched before BPE) and it
   is kept if the corpus gets at least `min_saving` tokens shorter. Adding a token changes
   only documents whose text contains it, so the savings are exact and add up:
   `report.tokens_before - report.tokens_after == sum(row.saving)`, which is what
   `report.tokenizer` gives on the same documents.

Documents are counted as whole texts (NFC-normalised, as the tokenizer sees them), without
the <|endoftext|> a CPT corpus appends (one per document either way).
"""

from __future__ import annotations

import io
import os
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence

from models.qwen.tokenizer import Tokenizer, TokenizerError

SP_SPACE = "\u2581"  # sentencepiece's visible space "▁"
MODEL_TYPES = ("unigram", "bpe")
RANKS = ("per_occurrence", "saving")


@dataclass(frozen=True)
class MinedToken:
    """One row of the report."""

    token: str
    id: int  # its id in report.tokenizer
    frequency: int  # how often report.tokenizer emits it on the corpus
    pieces: tuple  # the Qwen pieces (text) the old tokenizer made of it
    saving: int  # corpus tokens saved by adding it on top of the rows above it

    @property
    def per_occurrence(self) -> float:
        return self.saving / self.frequency if self.frequency else 0.0


@dataclass
class MiningReport:
    """The chosen tokens with their measured savings, and the corpus totals."""

    rows: List[MinedToken]
    tokens_before: int
    tokens_after: int
    documents: int
    characters: int
    candidates: int  # candidates measured
    source: str  # where the tokens came from
    tokenizer: Tokenizer = field(repr=False)  # the old tokenizer + the tokens

    @property
    def tokens(self) -> List[str]:
        return [r.token for r in self.rows]

    @property
    def saving(self) -> int:
        return self.tokens_before - self.tokens_after

    def to_dict(self) -> dict:
        return {
            "source": self.source, "documents": self.documents, "characters": self.characters,
            "candidates_measured": self.candidates, "tokens_before": self.tokens_before,
            "tokens_after": self.tokens_after, "saving": self.saving,
            "tokens": [{"token": r.token, "id": r.id, "frequency": r.frequency, "pieces_before": list(r.pieces),
                        "saving": r.saving} for r in self.rows],
        }

    def table(self) -> str:
        """The report as an aligned text table plus the corpus totals."""
        head = f"{'#':>3}  {'token':<24} {'id':>7} {'freq':>7}  {'Qwen pieces before':<36} {'saving':>7} {'/occ':>5}"
        lines = [head, "-" * len(head)]
        for i, r in enumerate(self.rows, 1):
            pieces = " ".join(repr(p) for p in r.pieces)
            pieces = pieces if len(pieces) <= 36 else pieces[:33] + "..."
            lines.append(f"{i:>3}  {repr(r.token):<24} {r.id:>7} {r.frequency:>7}  {pieces:<36} "
                         f"{r.saving:>7} {r.per_occurrence:>5.2f}")
        pct = 100.0 * self.saving / max(self.tokens_before, 1)
        lines.append(
            f"corpus: {self.documents} documents, {self.characters:,} characters: {self.tokens_before:,} -> "
            f"{self.tokens_after:,} Qwen tokens (-{self.saving:,}, -{pct:.2f}%) with {len(self.rows)} new tokens "
            f"({self.source})"
        )
        return "\n".join(lines)


# ---------------------------------------------------------------------- sentencepiece
def sentencepiece_pieces(
    texts: Sequence[str],
    model_type: str = "unigram",
    vocab_size: int = 4000,
    num_threads: Optional[int] = None,
    options: Optional[dict] = None,
) -> List[str]:
    """Train a sentencepiece model on `texts` (one sentence per line) and return its pieces.

    Pieces are as sentencepiece spells them ("▁" = space), most probable / earliest first,
    without the control and unknown pieces. options: extra SentencePieceTrainer arguments.
    """
    import sentencepiece as spm

    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    lines = [line.strip() for text in texts for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError("the corpus holds no text to train sentencepiece on")
    settings = dict(
        model_type=model_type, vocab_size=vocab_size, hard_vocab_limit=False,  # small corpora: fewer pieces
        character_coverage=1.0, normalization_rule_name="identity",  # pieces must be the corpus's own text
        bos_id=-1, eos_id=-1, unk_id=0, max_sentence_length=1 << 16, minloglevel=2,
        num_threads=num_threads or min(os.cpu_count() or 1, 8),
    )
    settings.update(options or {})
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, **settings)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    return [sp.id_to_piece(i) for i in range(sp.get_piece_size())
            if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i))]


def piece_texts(piece: str) -> List[str]:
    """The candidate texts of one sentencepiece piece: "▁word" -> [" word", "word"]."""
    if piece.startswith(SP_SPACE):
        rest = piece[len(SP_SPACE):]
        return [" " + rest, rest] if rest else []
    return [piece]


# ---------------------------------------------------------------------- measuring
def document_lengths(texts: Sequence[str], tokenizer: Tokenizer) -> List[int]:
    """Qwen tokens of each text (encode_batch: threaded)."""
    return [len(ids) for ids in tokenizer.encode_batch(list(texts))]


@dataclass(frozen=True)
class _Candidate:
    token: str
    occurrences: int
    pieces: int  # Qwen tokens of the text alone


def _plausible(text: str) -> bool:
    """A word-like candidate: has a letter; whitespace only as one leading space."""
    body = text[1:] if text.startswith(" ") else text
    return bool(body) and any(c.isalpha() for c in body) and not any(c.isspace() for c in body)


def _word_starts(corpus: str, text: str) -> int:
    """Occurrences of `text` not preceded by a letter."""
    return len(re.findall(r"(?<![^\W\d_])" + re.escape(text), corpus))


def _candidates(texts: Sequence[str], tokenizer: Tokenizer, pieces: Iterable[str], min_frequency: int) -> List[_Candidate]:
    corpus = "\n".join(texts)  # candidates hold no line break, so none spans two documents
    seen = set()
    out = []
    for piece in pieces:
        for text in piece_texts(piece):
            if text in seen or not _plausible(text):
                continue
            seen.add(text)
            try:
                tokenizer.check_new_token(text)
            except TokenizerError:
                continue  # already a Qwen token, contains a special token, ...
            n_pieces = len(tokenizer.encode(text))
            if n_pieces < 2:
                continue
            if not text.startswith(" ") and len(tokenizer.encode(" " + text)) == 1:
                continue  # " text" is one Qwen token: matching "text" first would split it
            occurrences = corpus.count(text)
            if occurrences < min_frequency:
                continue
            if text[0].islower() and 2 * _word_starts(corpus, text) < occurrences:
                continue  # mostly the tail of a longer word ("nvalidStateError"): a fragment
            out.append(_Candidate(text, occurrences, n_pieces))
    return out


def _select(
    texts: Sequence[str],
    tokenizer: Tokenizer,
    tokens: Iterable[str],
    max_tokens: Optional[int],
    min_saving: Optional[int],
):
    """Greedy exact selection: (accepted tokens, their savings, measured count, extended tokenizer).

    min_saving None keeps every token (a given list); mining skips tokens that fail the checks.
    """
    lengths = document_lengths(texts, tokenizer)
    current = tokenizer
    accepted: List[str] = []
    savings: List[int] = []
    measured = 0
    for token in tokens:
        if max_tokens is not None and len(accepted) >= max_tokens:
            break
        try:
            trial = current.with_added_tokens([token])
        except TokenizerError:
            if min_saving is None:
                raise
            continue
        measured += 1
        hit = [i for i, doc in enumerate(texts) if token in doc]  # the only documents it can change
        after = document_lengths([texts[i] for i in hit], trial)
        saving = sum(lengths[i] for i in hit) - sum(after)
        if min_saving is not None and saving < min_saving:
            continue
        for i, n in zip(hit, after):
            lengths[i] = n
        current = trial
        accepted.append(token)
        savings.append(saving)
    return accepted, savings, measured, current


def _report(texts, tokenizer, accepted, savings, measured, extended, source) -> MiningReport:
    before = sum(document_lengths(texts, tokenizer))
    encoded = extended.encode_batch(list(texts))  # the final tokenizer, from scratch
    after = sum(len(ids) for ids in encoded)
    counts = Counter(i for ids in encoded for i in ids if i >= len(tokenizer))
    rows = []
    for token, saving in zip(accepted, savings):
        idx = extended.token_to_id(token)
        pieces = tuple(tokenizer.token_bytes(i).decode("utf-8", "backslashreplace") for i in tokenizer.encode(token))
        rows.append(MinedToken(token, idx, counts[idx], pieces, saving))
    return MiningReport(rows, before, after, len(texts), sum(len(t) for t in texts), measured, source, extended)


def _normalised(texts: Iterable[str], tokenizer: Tokenizer) -> List[str]:
    out = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"document {i}: expected str, got {type(text).__name__}")
        out.append(unicodedata.normalize("NFC", text) if tokenizer.normalize_nfc else text)
    if not any(out):
        raise ValueError("the corpus is empty (no documents with text)")
    return out


def mine_tokens(
    texts: Iterable[str],
    tokenizer: Tokenizer,
    max_tokens: int = 32,
    min_frequency: int = 20,
    min_saving: Optional[int] = None,
    model_type: str = "unigram",
    sp_vocab_size: int = 4000,
    rank: str = "per_occurrence",
    max_candidates: Optional[int] = None,
    sentencepiece_options: Optional[dict] = None,
) -> MiningReport:
    """Propose up to `max_tokens` domain tokens for `tokenizer` from the documents `texts`.

    min_frequency: occurrences a candidate needs in the corpus. min_saving: corpus tokens a
    token must save when measured (default: min_frequency, i.e. about one per occurrence).
    rank: "per_occurrence" (Qwen tokens one occurrence saves, then occurrences) or "saving"
    (estimated total). max_candidates: stop measuring after this many (default: all).
    """
    if rank not in RANKS:
        raise ValueError(f"rank must be one of {RANKS}, got {rank!r}")
    if max_tokens < 1 or min_frequency < 1:
        raise ValueError(f"max_tokens and min_frequency must be >= 1, got {max_tokens} and {min_frequency}")
    docs = _normalised(texts, tokenizer)
    pieces = sentencepiece_pieces(docs, model_type, sp_vocab_size, options=sentencepiece_options)
    pool = _candidates(docs, tokenizer, pieces, min_frequency)
    if rank == "per_occurrence":
        pool.sort(key=lambda c: (-(c.pieces - 1), -c.occurrences, c.token))
    else:
        pool.sort(key=lambda c: (-(c.pieces - 1) * c.occurrences, c.token))
    if max_candidates is not None:
        pool = pool[:max_candidates]
    accepted, savings, measured, extended = _select(
        docs, tokenizer, [c.token for c in pool], max_tokens, min_frequency if min_saving is None else min_saving)
    source = f"sentencepiece {model_type}, {len(pieces)} pieces, {len(pool)} candidates"
    return _report(docs, tokenizer, accepted, savings, measured, extended, source)


def measure_tokens(texts: Iterable[str], tokenizer: Tokenizer, tokens: Sequence[str]) -> MiningReport:
    """The mining report for a given list of tokens, in its order (every token kept).

    The tokens are checked as `Tokenizer.with_added_tokens` does (TokenizerError otherwise).
    """
    docs = _normalised(texts, tokenizer)
    tokenizer.with_added_tokens(list(tokens))  # every error at once, before measuring
    accepted, savings, measured, extended = _select(docs, tokenizer, list(tokens), None, None)
    return _report(docs, tokenizer, accepted, savings, measured, extended, f"given list of {len(accepted)} tokens")


def count_tokens(texts: Iterable[str], tokenizer: Tokenizer) -> int:
    """Total Qwen tokens of the documents (as the mining report counts them)."""
    return sum(document_lengths(_normalised(texts, tokenizer), tokenizer))


__all__ = [
    "MinedToken", "MiningReport", "mine_tokens", "measure_tokens", "count_tokens",
    "sentencepiece_pieces", "piece_texts", "document_lengths",
]
