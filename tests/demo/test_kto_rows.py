"""The embedded KTO default's rows (demo.corpus.kto_rows): per question the real answer (true) and
the same answer degenerated into a loop (false); balanced, and no text is both labels."""

from __future__ import annotations

import json

from data import KTODataset
from demo.corpus import KTO_HELD_OUT_QUESTIONS, PydocsPaths, kto_rows, looped
from models.qwen import Tokenizer


def test_looped_repeats_the_first_words():
    assert looped("Return the current date.") == "Return the Return the Return the"
    assert looped("`f(x)`") == "`f(x)` `f(x)` `f(x)`"
    assert looped("one two three four five six seven eight nine ten") == \
        "one two three four one two three four one two three four one two"   # 10 words + 4


def test_rows_are_balanced_and_read_by_kto_dataset(tmp_path):
    qa = [(f"What does f{i} do?", f"It returns {i} squared, quickly.") for i in range(KTO_HELD_OUT_QUESTIONS + 3)]
    for name in ("sft_train", "sft_eval"):
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
            for q, a in qa), encoding="utf-8")
    paths = PydocsPaths(tmp_path, tmp_path / "d", tmp_path / "g", tmp_path / "sft_train.jsonl",
                        tmp_path / "sft_eval.jsonl", {})
    train, held_out = kto_rows(paths)
    rows = [json.loads(x) for x in train.read_text().splitlines()]
    assert len(rows) == 2 * len(qa) and [r["label"] for r in rows[:2]] == [True, False]
    good = {r["completion"][0]["content"] for r in rows if r["label"]}
    bad = {r["completion"][0]["content"] for r in rows if not r["label"]}
    assert good == {a for _, a in qa} and not good & bad
    assert rows[1]["completion"][0]["content"] == looped(qa[0][1])
    assert len(held_out.read_text().splitlines()) == 2 * KTO_HELD_OUT_QUESTIONS
    ds = KTODataset(train, Tokenizer.default(), max_len=256)
    assert ds.desirable == ds.undesirable == len(qa)
