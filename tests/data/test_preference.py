"""Preference pairs: the record formats of TRL and LLaMA-Factory, encoding against transformers'
own chat-template rendering, truncation, errors naming file:line, the concatenated collate, the
split, and demo pairs from SFT conversations."""

from __future__ import annotations

import json

import pytest
import torch

from data import DataError, SFTDataset
from data.preference import (
    PreferenceDataset,
    detect_preference_format,
    encode_pair,
    pairs_from_sft,
    preference_collate,
    to_preference,
)
from models.qwen.chat_template import QWEN25_CHAT_TEMPLATE
from tests.data.conftest import write_jsonl

IM_END, ENDOFTEXT = 151645, 151643
SYSTEM = {"role": "system", "content": "Be brief."}
MULTI_TURN = [SYSTEM, {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
              {"role": "user", "content": "And times three?"}]
CHOSEN, REJECTED = "Twelve: 4 × 3 = 12.", "\nIt is seven, I think."  # the rejected one starts with "\n"


def scored(labels):
    return [t for t in labels if t != -100]


def hf_reference(hf_tok, prompt, answer):
    """transformers' Jinja rendering of prompt + answer, tokenised as one string: (ids up to the
    answer's <|im_end|>, the tokens overlapping the answer's content or its <|im_end|>, prompt ids
    with the generation prompt)."""
    messages = prompt + [{"role": "assistant", "content": answer}]
    text = hf_tok.apply_chat_template(messages, chat_template=QWEN25_CHAT_TEMPLATE, tokenize=False)
    enc = hf_tok(text, add_special_tokens=False, return_offsets_mapping=True)
    start = text.rindex("<|im_start|>assistant\n") + len("<|im_start|>assistant\n")
    stop = start + len(answer) + len("<|im_end|>")
    ids = [t for t, (s, e) in zip(enc["input_ids"], enc["offset_mapping"]) if s < stop]
    answer_tokens = [t for t, (s, e) in zip(enc["input_ids"], enc["offset_mapping"]) if s < stop and e > start]
    prompt_ids = hf_tok.apply_chat_template(prompt, chat_template=QWEN25_CHAT_TEMPLATE, add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
    return ids, answer_tokens, list(prompt_ids)


def test_rows_match_transformers_rendering(tok, hf_tok):
    prompt, chosen, rejected = to_preference({"prompt": MULTI_TURN, "chosen": CHOSEN, "rejected": REJECTED})
    enc = encode_pair(prompt, chosen, rejected, tok)
    for answer, ids, labels in ((CHOSEN, enc.chosen_ids, enc.chosen_labels),
                                (REJECTED, enc.rejected_ids, enc.rejected_labels)):
        ref_ids, ref_scored, ref_prompt = hf_reference(hf_tok, MULTI_TURN, answer)
        assert enc.prompt_ids + ids == ref_ids
        assert scored(labels) == ref_scored  # the earlier answer "4." is context, never scored
        assert scored(labels)[-1] == IM_END
        assert len(labels) == len(ids)
        # The shared prompt is the generation prompt, up to the header's "\n" that the rejected
        # answer's leading "\n" merges with.
        assert ref_prompt[: len(enc.prompt_ids)] == enc.prompt_ids and len(ref_prompt) - len(enc.prompt_ids) == 1
    assert tok.decode(scored(enc.chosen_labels)) == CHOSEN + "<|im_end|>"


FORMATS = {
    "trl-strings": ({"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."}, "trl"),
    "trl-messages": ({"prompt": [{"role": "user", "content": "Name a colour."}],
                      "chosen": [{"role": "assistant", "content": "Blue."}],
                      "rejected": [{"role": "assistant", "content": "Seven."}]}, "trl"),
    "trl-messages-key": ({"messages": [{"role": "user", "content": "Name a colour."}],
                          "chosen": {"role": "assistant", "content": "Blue."}, "rejected": "Seven."}, "trl"),
    "trl-implicit": ({"chosen": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
                      "rejected": [{"role": "user", "content": "Name a colour."},
                                   {"role": "assistant", "content": "Seven."}]}, "trl-implicit"),
    "sharegpt": ({"conversations": [{"from": "human", "value": "Name a colour."}],
                  "chosen": {"from": "gpt", "value": "Blue."}, "rejected": {"from": "gpt", "value": "Seven."}}, "sharegpt"),
    "alpaca": ({"instruction": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."}, "alpaca"),
}


@pytest.mark.parametrize("name", list(FORMATS))
def test_formats_give_the_same_pair(tok, name):
    record, fmt = FORMATS[name]
    assert detect_preference_format(record) == fmt
    prompt, chosen, rejected = to_preference(record)
    assert prompt == [{"role": "user", "content": "Name a colour."}]
    assert (chosen["content"], rejected["content"]) == ("Blue.", "Seven.")
    assert chosen["role"] == rejected["role"] == "assistant"


def test_system_prompt_in_every_format(tok):
    expected = [SYSTEM, {"role": "user", "content": "Q"}]
    records = [
        {"prompt": [SYSTEM, {"role": "user", "content": "Q"}], "chosen": "A", "rejected": "B"},
        {"prompt": "Q", "system": "Be brief.", "chosen": "A", "rejected": "B"},
        {"conversations": [{"from": "human", "value": "Q"}], "system": "Be brief.",
         "chosen": {"from": "gpt", "value": "A"}, "rejected": {"from": "gpt", "value": "B"}},
        {"instruction": "Q", "system": "Be brief.", "chosen": "A", "rejected": "B"},
    ]
    for record in records:
        assert to_preference(record)[0] == expected
    # A dataset-wide default applies only where the record has none.
    p, c, r = to_preference({"prompt": "Q", "chosen": "A", "rejected": "B"})
    default = encode_pair(p, c, r, tok, system="Be brief.")
    own = encode_pair(*to_preference(records[1]), tok, system="Something else.")
    assert default.prompt_ids == own.prompt_ids
    assert "Be brief." in tok.decode(default.prompt_ids)


def test_multi_turn_sharegpt_and_alpaca_history(tok):
    sharegpt = {"conversations": [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
                                  {"from": "human", "value": "q2"}],
                "chosen": {"from": "gpt", "value": "good"}, "rejected": {"from": "gpt", "value": "bad"}}
    alpaca = {"instruction": "q2", "history": [["q1", "a1"]], "chosen": "good", "rejected": "bad"}
    assert to_preference(sharegpt) == to_preference(alpaca)
    assert [m["role"] for m in to_preference(sharegpt)[0]] == ["user", "assistant", "user"]


def _long_pair():
    prompt = [SYSTEM, {"role": "user", "content": "old question " * 20}, {"role": "assistant", "content": "old answer " * 20},
              {"role": "user", "content": "FIRST " + "word " * 60 + "END"}]
    return prompt, {"role": "assistant", "content": "yes " * 50}, {"role": "assistant", "content": "no " * 10}


def test_truncation_drops_old_turns_then_cuts_the_prompt_from_the_left(tok):
    prompt, chosen, rejected = _long_pair()
    full = encode_pair(prompt, chosen, rejected, tok)
    assert len(full.prompt_ids) > 150 and len(full.chosen_ids) > 50
    enc = encode_pair(prompt, chosen, rejected, tok, max_len=100)
    text = tok.decode(enc.prompt_ids)
    assert enc.history_turns_dropped == 1 and "old question" not in text and "old answer" not in text
    assert "Be brief." in text  # the system message stays
    assert enc.prompt_tokens_cut > 0 and "END" in text and "FIRST" not in text  # the end of the question stays
    assert len(enc.prompt_ids) == 100 // 2  # the prompt went down to max_prompt_len (default max_len // 2)
    # Then both responses are cut to one budget, keeping their start: the short one is whole.
    assert enc.row_length == 100
    assert len(enc.chosen_ids) == 100 - len(enc.prompt_ids) and enc.response_tokens_cut > 0
    assert enc.chosen_ids == full.chosen_ids[: len(enc.chosen_ids)]
    assert enc.rejected_ids == full.rejected_ids and scored(enc.rejected_labels)[-1] == IM_END


def test_truncation_keeps_what_fits(tok):
    prompt, chosen, rejected = _long_pair()
    full = encode_pair(prompt, chosen, rejected, tok)
    same = encode_pair(prompt, chosen, rejected, tok, max_len=full.row_length)
    assert same == full
    # Room for the whole responses: only the prompt is cut, to exactly what the longer one leaves.
    enc = encode_pair(prompt, chosen, rejected, tok, max_len=full.row_length - 30, max_prompt_len=10)
    assert enc.chosen_ids == full.chosen_ids and enc.rejected_ids == full.rejected_ids
    assert enc.row_length <= full.row_length - 30 and enc.response_tokens_cut == 0


def test_a_response_left_without_tokens_is_dropped_and_counted(tok, tmp_path):
    prompt, chosen, rejected = _long_pair()
    with pytest.raises(DataError, match="too-long|no token of the chosen response") as err:
        encode_pair([SYSTEM, prompt[-1]], chosen, rejected, tok, max_len=40, min_prompt_tokens=30, where="f.jsonl:3")
    assert err.value.reason == "too-long" and str(err.value).startswith("f.jsonl:3: ")
    records = [{"prompt": [SYSTEM, prompt[-1]], "chosen": "yes " * 50, "rejected": "no"},
               {"prompt": "Hi", "chosen": "Hello", "rejected": "Go"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    ds = PreferenceDataset(path, tok, max_len=40, min_prompt_tokens=30, on_error="skip")
    assert len(ds) == 1 and ds.report.skipped["too-long"] == 1 and ds.report.kept == 1
    with pytest.raises(DataError, match=r"pairs\.jsonl:1: "):
        PreferenceDataset(path, tok, max_len=40, min_prompt_tokens=30)


BAD = [
    ('{"prompt": "Q", "chosen": "A"}', "missing field 'rejected'"),
    ('{"prompt": "Q", "chosen": "A", "rejected": [{"role": "user", "content": "B"}]}', "field 'rejected'.*assistant"),
    ('{"prompt": "Q", "chosen": ["A", "B"], "rejected": "B"}', "one assistant message"),
    ('{"prompt": [{"role": "assistant", "content": "Q"}], "chosen": "A", "rejected": "B"}', "role 'assistant', expected 'user'"),
    ('{"chosen": "A", "rejected": "B"}', "no 'prompt' field"),
    ('{"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], '
     '"rejected": [{"role": "user", "content": "R"}, {"role": "assistant", "content": "B"}]}', "same conversation up to"),
    ('{"prompt": "Q", "chosen": 3, "rejected": "B"}', "field 'chosen'"),
    ('{"prompt": "Q", "chosen": "A", "rejected": "B"', "malformed JSON"),
]


@pytest.mark.parametrize("line, message", BAD, ids=[m for _, m in BAD])
def test_bad_pairs_name_file_and_line(tok, tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", ['{"prompt": "Hi", "chosen": "Hello", "rejected": "Go"}', line])
    with pytest.raises(DataError, match=message) as err:
        PreferenceDataset(path, tok)
    assert str(err.value).startswith(f"{path}:2: ")
    ds = PreferenceDataset(path, tok, on_error="skip")
    assert len(ds) == 1 and ds.report.n_skipped == 1


def _pairs_file(tmp_path, n=10, name="pairs.jsonl"):
    records = [{"prompt": f"Question {i}?" + " more" * (i % 4), "chosen": f"Answer {i}." + " yes" * i,
                "rejected": "No." + " no" * (3 * (i % 3))} for i in range(n)]
    return write_jsonl(tmp_path / name, records), records


def test_dataset_items_and_json_list_files(tok, tmp_path):
    path, records = _pairs_file(tmp_path, n=4)
    (tmp_path / "pairs.json").write_text(json.dumps(records), encoding="utf-8")
    ds, listed = PreferenceDataset(path, tok), PreferenceDataset(tmp_path / "pairs.json", tok)
    assert len(ds) == len(listed) == 4
    for i in range(4):
        item = ds[i]
        assert all(torch.equal(item[k], listed[i][k]) for k in item)
        c, r = item["chosen_input_ids"], item["rejected_input_ids"]
        prompt = int((item["chosen_labels"] != -100).nonzero()[0])
        assert torch.equal(c[:prompt], r[:prompt])  # one shared prompt
        assert tok.decode(scored(item["chosen_labels"].tolist())) == records[i]["chosen"] + "<|im_end|>"
        assert tok.decode(scored(item["rejected_labels"].tolist())) == records[i]["rejected"] + "<|im_end|>"
        assert ds.lengths()[i] == max(len(c), len(r))


def test_collate_concatenates_chosen_then_rejected(tok, tmp_path):
    path, _ = _pairs_file(tmp_path, n=3)
    ds = PreferenceDataset(path, tok)
    items = [ds[i] for i in range(3)]
    batch = preference_collate(items)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert batch["input_ids"].shape[0] == 6
    rows = [it["chosen_input_ids"] for it in items] + [it["rejected_input_ids"] for it in items]
    labels = [it["chosen_labels"] for it in items] + [it["rejected_labels"] for it in items]
    for b, (ids, lab) in enumerate(zip(rows, labels)):
        n = len(ids)
        assert torch.equal(batch["input_ids"][b, :n], ids) and torch.equal(batch["labels"][b, :n], lab)
        assert (batch["input_ids"][b, n:] == ENDOFTEXT).all() and (batch["labels"][b, n:] == -100).all()
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
    refs = [dict(it, ref_chosen_logps=torch.tensor(-1.0 - i), ref_rejected_logps=torch.tensor(-5.0 - i))
            for i, it in enumerate(items)]
    with_ref = preference_collate(refs)
    assert with_ref["ref_chosen_logps"].tolist() == [-1.0, -2.0, -3.0]
    assert with_ref["ref_rejected_logps"].dtype == torch.float32
    with pytest.raises(ValueError, match="some items carry"):
        preference_collate([refs[0], items[1]])


def test_split_is_seeded_and_follows_the_sft_rule(tok, tmp_path):
    path, _ = _pairs_file(tmp_path, n=10)
    ds = PreferenceDataset(path, tok)
    train, val = ds.split(val_fraction=0.2, seed=3)
    assert len(val) == 2 and len(train) == 8
    assert sorted(list(train.indices) + list(val.indices)) == list(range(10))
    assert list(ds.split(0.2, seed=3)[1].indices) == list(val.indices)
    assert list(ds.split(0.2, seed=4)[1].indices) != list(val.indices) or list(ds.split(0.2, seed=5)[1].indices) != list(val.indices)
    sft_path = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(10)])
    assert list(SFTDataset(sft_path, tok).split(0.2, seed=3)[1].indices) == list(val.indices)
    assert train.lengths().tolist() == ds.lengths()[train.indices].tolist()


SFT_RECORDS = [
    {"instruction": "Capital of France?", "output": "Paris."},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4."}]},
    {"conversations": [{"from": "human", "value": "Colour of the sky?"}, {"from": "gpt", "value": "Blue."}]},
    {"instruction": "Opposite of hot?", "output": "Cold."},
    {"instruction": "Same answer as the first?", "output": "Paris."},
]


def test_pairs_from_sft(tok, tmp_path):
    pairs = pairs_from_sft(SFT_RECORDS, seed=0)
    answers = ["Paris.", "4.", "Blue.", "Cold.", "Paris."]
    assert len(pairs) == len(SFT_RECORDS)
    rejected = []
    for record, pair, answer in zip(SFT_RECORDS, pairs, answers):
        assert pair["chosen"] == [{"role": "assistant", "content": answer}]
        other = pair["rejected"][0]["content"]
        assert other in answers and other != answer  # another question's answer, never the same text
        rejected.append(other)
    assert pairs[1]["prompt"][0] == {"role": "system", "content": "Be brief."}
    assert pairs_from_sft(SFT_RECORDS, seed=0) == pairs  # deterministic by seed
    assert any(pairs_from_sft(SFT_RECORDS, seed=s) != pairs for s in (1, 2, 3))
    # They are records of the TRL format: they load as a preference dataset.
    ds = PreferenceDataset(write_jsonl(tmp_path / "demo.jsonl", pairs), tok)
    assert len(ds) == 5
    with pytest.raises(DataError, match="distinct answer"):
        pairs_from_sft([SFT_RECORDS[0], SFT_RECORDS[4]], seed=0)
    with pytest.raises(DataError, match="record 1"):
        pairs_from_sft([SFT_RECORDS[0], {"instruction": "no output"}], seed=0)
