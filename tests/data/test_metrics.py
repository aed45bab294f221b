"""ROUGE-L, exact match and token F1 against values computed by hand (English and Chinese)."""

import itertools
import random

import pytest

from data.metrics import (
    answer_tokens,
    exact_match,
    generation_scores,
    has_cjk,
    lcs_length,
    normalize_answer,
    rouge_l,
    rouge_tokens,
    token_f1,
)

approx = pytest.approx


# ---------------------------------------------------------------------- LCS
def test_lcs_classic_example():
    assert lcs_length("ABCBDAB", "BDCABA") == 4  # CLRS 15.4: BCBA
    assert lcs_length("", "abc") == 0
    assert lcs_length("abc", "abc") == 3


def _brute_force_lcs(a, b):
    # The longest subsequence of `a` that is also a subsequence of `b`, by enumeration.
    def is_subseq(s, t):
        it = iter(t)
        return all(x in it for x in s)

    for k in range(len(a), 0, -1):
        if any(is_subseq(c, b) for c in itertools.combinations(a, k)):
            return k
    return 0


def test_lcs_equals_brute_force_on_random_sequences():
    rng = random.Random(0)
    for _ in range(200):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 8))]
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 8))]
        assert lcs_length(a, b) == _brute_force_lcs(a, b) == _brute_force_lcs(b, a)


# ---------------------------------------------------------------------- ROUGE-L
@pytest.mark.parametrize(
    "pred, ref, p, r",
    [
        # LCS "the cat on the mat" = 5 of 6 words each.
        ("the cat is on the mat", "the cat sat on the mat", 5 / 6, 5 / 6),
        # Lin (2004)'s example: "police the gunman" = 3 of 4; "the gunman" = 2 of 4.
        ("police kill the gunman", "police killed the gunman", 3 / 4, 3 / 4),
        ("the gunman kill police", "police killed the gunman", 2 / 4, 2 / 4),
        # Case and punctuation are ignored: LCS "serialize obj json" = 3; 4 vs 7 words.
        ("Serialize obj as JSON.", "Serialize ``obj`` to a JSON formatted str", 3 / 4, 3 / 7),
        # snake_case splits into words, as rouge_score's tokenizer does: sort, keys | 3 words.
        ("sort_keys", "sort the keys", 2 / 2, 2 / 3),
        ("cat the", "the cat", 1 / 2, 1 / 2),
        ("dog", "the cat", 0.0, 0.0),
    ],
)
def test_rouge_l_english_word_level(pred, ref, p, r):
    s = rouge_l(pred, ref)
    f = 0.0 if p + r == 0 else 2 * p * r / (p + r)
    assert (s.precision, s.recall, s.fmeasure) == (approx(p), approx(r), approx(f))


@pytest.mark.parametrize(
    "pred, ref, p, r",
    [
        # 8 characters each (the full stop is punctuation); LCS "中国的首都" = 5.
        ("中国的首都是北京", "北京是中国的首都。", 5 / 8, 5 / 8),
        # Latin letters inside Chinese text count per character, case-folded:
        # pred 用 j s o n 模 块 (7), ref 使 用 j s o n 模 块 (8), LCS 7.
        ("用 JSON 模块", "使用json模块", 7 / 7, 7 / 8),
        # Prediction longer than the reference: LCS 北京大学 = 4 of 8 and of 4.
        ("北京大学的图书馆", "北京大学", 4 / 8, 4 / 4),
        # Spaces between characters do not matter at character level.
        ("北 京", "北京", 1.0, 1.0),
    ],
)
def test_rouge_l_chinese_character_level(pred, ref, p, r):
    s = rouge_l(pred, ref)
    assert (s.precision, s.recall, s.fmeasure) == (approx(p), approx(r), approx(2 * p * r / (p + r)))


def test_rouge_level_follows_the_reference():
    # A Chinese answer to an English reference is scored by words: "北京" is one word, no match.
    assert rouge_l("北京", "Beijing").fmeasure == 0.0
    # Forcing character level on English text: c a t vs c a r -> LCS 2 of 3.
    assert rouge_l("cat", "car", level="char").fmeasure == approx(2 / 3)
    # Forcing word level on Chinese: one "word" each, different -> 0.
    assert rouge_l("北京大学", "北京", level="word").fmeasure == 0.0
    with pytest.raises(ValueError, match="level"):
        rouge_l("a", "b", level="sentence")


def test_rouge_l_empty_after_tokenisation():
    assert rouge_l("", "the cat").fmeasure == 0.0
    assert rouge_l("the cat", "").fmeasure == 0.0
    assert rouge_l("!!!", "...").fmeasure == 1.0  # both empty: identical
    assert rouge_l("", "").fmeasure == 1.0


def test_rouge_tokens():
    assert rouge_tokens("JSON 模块。", "char") == ["j", "s", "o", "n", "模", "块"]
    assert rouge_tokens("Hello, World! it's 2024", "word") == ["hello", "world", "it", "s", "2024"]
    assert has_cjk("json 模块") and has_cjk("カタカナ") and has_cjk("한국어") and not has_cjk("naïve café")


# ---------------------------------------------------------------------- EM / F1 (SQuAD)
def test_normalisation_is_squads():
    assert normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert normalize_answer("an apple, a pear") == "apple pear"
    # Articles only as whole words: "theory" and "Anna" keep their letters.
    assert normalize_answer("Theory of Anna") == "theory of anna"
    # Chinese: punctuation (full width too) removed, characters split apart.
    assert normalize_answer("北京大学。") == "北 京 大 学"
    assert answer_tokens("用json模块") == ["用", "json", "模", "块"]


@pytest.mark.parametrize(
    "pred, ref, em, f1",
    [
        ("The Denver Broncos", "Denver Broncos", 1.0, 1.0),
        # pred {denver, broncos, won} vs ref {denver, broncos}: P 2/3, R 1 -> 0.8.
        ("Denver Broncos won", "the Denver Broncos", 0.0, 0.8),
        # Token multiset overlap: x:1 + y:2 = 3 of 4 and of 4.
        ("x y y z", "y y y x", 0.0, 0.75),
        ("Hello, world!", "hello world", 1.0, 1.0),
        ("Carolina Panthers", "Denver Broncos", 0.0, 0.0),
        ("", "Denver", 0.0, 0.0),
        ("the", "a", 1.0, 1.0),  # both normalise to nothing
        # Chinese: same characters with or without spaces/punctuation.
        ("北京大学。", "北京 大学", 1.0, 1.0),
        # 4 common characters; P 4/8, R 4/4 -> 2/3.
        ("北京大学的图书馆", "北京大学", 0.0, 2 / 3),
        # Mixed: {用, json, 模, 块} vs {使, 用, json, 模, 块}: P 1, R 4/5 -> 8/9.
        ("用json模块", "使用 JSON 模块", 0.0, 8 / 9),
    ],
)
def test_exact_match_and_f1(pred, ref, em, f1):
    assert exact_match(pred, ref) == em
    assert token_f1(pred, ref) == approx(f1)


def test_several_references_take_the_best():
    # vs "denver broncos of colorado": P 1, R 1/4 -> 0.4; vs "broncos team": P 1, R 1/2 -> 2/3.
    assert token_f1("Broncos", ["Denver Broncos of Colorado", "Broncos team"]) == approx(2 / 3)
    assert exact_match("broncos", ["Denver Broncos", "The Broncos"]) == 1.0
    with pytest.raises(ValueError, match="reference"):
        token_f1("x", [])


# ---------------------------------------------------------------------- aggregate
def test_generation_scores_by_hand():
    preds = ["the cat", "北京"]
    refs = ["The cat.", "北京大学"]
    out = generation_scores(preds, refs, lengths=[2, 3], stopped=[True, False])
    # ROUGE-L: 1 (same words) and char-level P 2/2, R 2/4 -> 2/3; mean 5/6.
    # EM: 1 and 0; F1: 1 and 2/3 (P 1, R 1/2).
    assert out == {
        "n": 2,
        "rouge_l": approx(5 / 6),
        "exact_match": approx(0.5),
        "token_f1": approx(5 / 6),
        "avg_length": approx(2.5),
        "stop_rate": approx(0.5),
    }


def test_generation_scores_errors():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        generation_scores(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="stopped"):
        generation_scores(["a"], ["a"], stopped=[True, False])
    with pytest.raises(ValueError, match="no predictions"):
        generation_scores([], [])
