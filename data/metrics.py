"""Text-overlap metrics for generated answers: ROUGE-L, exact match, token F1 (pure functions).

All scores are fractions in [0, 1]. Two tokenisations are used:

* ROUGE-L (`rouge_l`) compares the longest common subsequence of two token lists. Chinese,
  Japanese and Korean text has no spaces between words, so for a CJK reference it works on
  characters (every non-space, non-punctuation character is a token); otherwise on words
  (lower-cased runs of letters/digits, as the `rouge_score` package's default tokenizer,
  extended to Unicode letters). The reference decides the level, so every prediction for
  one example is scored the same way.
* Exact match and token F1 (`exact_match`, `token_f1`) follow the SQuAD v1.1 evaluation
  script: lower-case, drop punctuation and the articles a/an/the, split on whitespace. CJK
  characters are split into single-character tokens as the CMRC 2018 script does, so
  "北京 大学" and "北京大学" are the same answer and F1 gives partial credit per character.

Both are 1.0 when prediction and reference are empty after normalisation, and 0.0 when only
one of them is (the SQuAD convention).
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

# CJK ideographs (+ extensions and compatibility), kana, Hangul syllables and jamo, bopomofo.
_CJK = (
    "\u1100-\u11ff\u2e80-\u2fdf\u3040-\u30ff\u3100-\u312f\u3130-\u318f\u31a0-\u31bf\u31f0-\u31ff"
    "\u3400-\u4dbf\u4e00-\u9fff\ua960-\ua97f\uac00-\ud7af\ud7b0-\ud7ff\uf900-\ufaff"
    "\U00020000-\U0002ffff\U00030000-\U0003134f"
)
_CJK_CHAR = re.compile(f"[{_CJK}]")
# A token for the SQuAD-style split: one CJK character, or a run of anything else but space.
_ANSWER_TOKEN = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+")
# A word for word-level ROUGE: a run of Unicode letters/digits (underscore splits, like
# rouge_score's [^a-z0-9]+ split, so `sort_keys` is two words).
_WORD = re.compile(r"[^\W_]+")
_ARTICLES = re.compile(r"\b(a|an|the)\b")

References = Union[str, Sequence[str]]


def has_cjk(text: str) -> bool:
    """True when `text` holds at least one CJK ideograph, kana or Hangul character."""
    return _CJK_CHAR.search(text) is not None


def _is_punct(ch: str) -> bool:
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


def _strip_punct(text: str) -> str:
    return "".join(ch for ch in text if not _is_punct(ch))


# ---------------------------------------------------------------------- ROUGE-L
@dataclass(frozen=True)
class RougeScore:
    """ROUGE-L of one prediction: LCS / len(prediction), LCS / len(reference), their F1."""

    precision: float
    recall: float
    fmeasure: float


def rouge_tokens(text: str, level: str) -> list[str]:
    """Tokens for ROUGE-L: level "char" (CJK) -> characters, "word" -> lower-cased words.

    Character level keeps every character that is neither whitespace nor punctuation, with
    ASCII letters lower-cased (so "JSON 模块。" -> ['j', 's', 'o', 'n', '模', '块']).
    """
    if level == "char":
        return [ch for ch in text.lower() if not ch.isspace() and not _is_punct(ch)]
    if level == "word":
        return _WORD.findall(text.lower())
    raise ValueError(f"ROUGE level must be 'char' or 'word', got {level!r}")


def rouge_level(reference: str) -> str:
    """The tokenisation ROUGE-L uses for an example: "char" for CJK references, else "word"."""
    return "char" if has_cjk(reference) else "word"


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of two sequences (O(len(a)·len(b)) time)."""
    if len(a) < len(b):
        a, b = b, a  # keep the DP row as short as the shorter sequence
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str, level: str = "auto") -> RougeScore:
    """ROUGE-L (sentence level, F1 with beta = 1) of one prediction against one reference.

    level: "auto" (character level when the reference contains CJK text, word level
    otherwise), "char" or "word".
    """
    if level == "auto":
        level = rouge_level(reference)
    pred, ref = rouge_tokens(prediction, level), rouge_tokens(reference, level)
    if not pred or not ref:
        same = float(pred == ref)
        return RougeScore(same, same, same)
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return RougeScore(0.0, 0.0, 0.0)
    p, r = lcs / len(pred), lcs / len(ref)
    return RougeScore(p, r, 2 * p * r / (p + r))


# ---------------------------------------------------------------------- SQuAD-style
def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lower-case, no punctuation, no articles, single spaces.

    Punctuation is Unicode-wide (so Chinese "，。" go too), and CJK characters are spaced
    apart, which makes the normalised string the tokens joined by single spaces.
    """
    text = _strip_punct(text.lower())
    text = _ARTICLES.sub(" ", text)
    return " ".join(_ANSWER_TOKEN.findall(text))


def answer_tokens(text: str) -> list[str]:
    """The tokens exact match and F1 compare: normalize_answer(text) split on spaces."""
    return normalize_answer(text).split()


def _as_list(references: References) -> list[str]:
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("at least one reference answer is needed")
    return refs


def exact_match(prediction: str, references: References) -> float:
    """1.0 when the normalised prediction equals a normalised reference, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(r) for r in _as_list(references)))


def _f1(pred: list[str], ref: list[str]) -> float:
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    p, r = common / len(pred), common / len(ref)
    return 2 * p * r / (p + r)


def token_f1(prediction: str, references: References) -> float:
    """SQuAD token F1 (bag of normalised tokens); the best over several references."""
    pred = answer_tokens(prediction)
    return max(_f1(pred, answer_tokens(r)) for r in _as_list(references))


# ---------------------------------------------------------------------- aggregate
def generation_scores(
    predictions: Sequence[str],
    references: Sequence[References],
    lengths: Optional[Sequence[int]] = None,
    stopped: Optional[Sequence[bool]] = None,
) -> dict:
    """Mean scores over a set of answers.

    predictions[i] is scored against references[i] (one string or several). `lengths`
    (generated tokens per answer) and `stopped` (the answer ended with the end-of-turn token)
    add `avg_length` and `stop_rate`. ROUGE-L with several references takes the best one.
    Returns {"n", "rouge_l", "exact_match", "token_f1"[, "avg_length"][, "stop_rate"]}.
    """
    n = len(predictions)
    if len(references) != n:
        raise ValueError(f"{n} predictions but {len(references)} references")
    for name, seq in (("lengths", lengths), ("stopped", stopped)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"{n} predictions but {len(seq)} {name}")
    if n == 0:
        raise ValueError("no predictions to score")
    rouge = [max(rouge_l(p, r).fmeasure for r in _as_list(refs)) for p, refs in zip(predictions, references)]
    out = {
        "n": n,
        "rouge_l": _mean(rouge),
        "exact_match": _mean(exact_match(p, r) for p, r in zip(predictions, references)),
        "token_f1": _mean(token_f1(p, r) for p, r in zip(predictions, references)),
    }
    if lengths is not None:
        out["avg_length"] = _mean(float(x) for x in lengths)
    if stopped is not None:
        out["stop_rate"] = _mean(float(bool(x)) for x in stopped)
    return out


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values)
