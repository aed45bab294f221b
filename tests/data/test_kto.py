"""KTO's unpaired rows against TRL 1.16's own KTOTrainer._prepare_dataset on transformers'
tokenizer (unpairing of preference pairs, chat-template tokenisation, the rotated KL
completions), the record formats, and bad rows named by file:line."""

from __future__ import annotations

import types

import pytest
import torch

from data import DataError, KTODataset, kto_collate
from tests.data.conftest import write_jsonl

NEWLINE = 198   # "\n": TRL's completion keeps the template's newline after <|im_end|>; ours ends at <|im_end|>
QA = [("What is a socket?", "An endpoint for data.", "A kind of fruit."),
      ("Name a colour.", "Blue.", "Seven."),
      ("What does json do?", "It encodes objects as text.", "It bakes bread.")]


def trl_rows(records, hf_tok, batch_size):
    """TRL's prepared rows (prompt_ids, completion_ids, KL_completion_ids, label) of `records`."""
    from datasets import Dataset
    from trl import KTOTrainer

    stub = types.SimpleNamespace(_tokenizer=hf_tok, calculate_KL=True, desirable_weight=1.0, undesirable_weight=1.0)
    args = types.SimpleNamespace(dataset_num_proc=None, max_length=None, per_device_train_batch_size=batch_size)
    return list(KTOTrainer._prepare_dataset(stub, Dataset.from_list(records), hf_tok, args, "train"))


def test_pairs_are_unpaired_and_tokenised_as_trl_does(tok, hf_tok, tmp_path):
    pairs = [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": good}],
              "rejected": [{"role": "assistant", "content": bad}]} for q, good, bad in QA]
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    ours = KTODataset(tmp_path / "pairs.jsonl", tok, max_len=None)
    n = len(QA)
    theirs = trl_rows(pairs, hf_tok, batch_size=2 * n)
    assert len(ours) == len(theirs) == 2 * n
    # TRL's unpairing puts the chosen rows first, then the rejected ones; ours keeps each pair's two adjacent
    order = [2 * i for i in range(n)] + [2 * i + 1 for i in range(n)]
    items = [ours[i] for i in order]
    for item, ref in zip(items, theirs):
        p = int(item["prompt_length"])
        assert item["input_ids"][:p].tolist() == ref["prompt_ids"]
        assert item["input_ids"][p:].tolist() + [NEWLINE] == ref["completion_ids"]
        assert item["labels"][:p].eq(-100).all() and item["labels"][p:].tolist() == item["input_ids"][p:].tolist()
        assert bool(item["label"]) is ref["label"]
    # the KL rows of one batch (TRL's order): each prompt with the previous row's completion
    batch = kto_collate(items)
    for i, ref in enumerate(theirs):
        want = ref["prompt_ids"] + ref["KL_completion_ids"][:-1]
        assert batch["kl_input_ids"][i, :len(want)].tolist() == want
        assert int(batch["kl_attention_mask"][i].sum()) == len(want)
        scored = batch["kl_labels"][i][batch["kl_labels"][i] != -100].tolist()
        assert scored == ref["KL_completion_ids"][:-1]
    assert batch["label"].tolist() == [True] * n + [False] * n


def test_kl_stride_rotates_each_process_share_alone(tok, tmp_path):
    """kl_stride=2 on 2b rows: the KL rows the two processes of train.MicroBatchSampler (rank r
    takes positions r, r + 2, ...) form from their b rows each; the default rotates all 2b."""
    rows = [{"prompt": q, "completion": a, "label": True} for q, a, _ in QA] + \
           [{"prompt": q, "completion": b, "label": False} for q, _, b in QA[:1]]
    write_jsonl(tmp_path / "rows.jsonl", rows)
    items = [KTODataset(tmp_path / "rows.jsonl", tok, max_len=None)[i] for i in range(4)]
    joint = kto_collate(items, kl_stride=2)
    for r in range(2):
        share = kto_collate(items[r::2])
        for i, j in enumerate(range(r, 4, 2)):
            n = int(share["kl_attention_mask"][i].sum())
            assert int(joint["kl_attention_mask"][j].sum()) == n
            assert torch.equal(joint["kl_input_ids"][j, :n], share["kl_input_ids"][i, :n])
            assert torch.equal(joint["kl_labels"][j, :n], share["kl_labels"][i, :n])
    assert not torch.equal(kto_collate(items)["kl_input_ids"], joint["kl_input_ids"])
    with pytest.raises(ValueError, match="kl_stride 3"):
        kto_collate(items, kl_stride=3)


def test_unpaired_formats_and_string_prompts(tok, hf_tok, tmp_path):
    rows = [{"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}],
             "label": i % 2 == 0} for i, (q, a, _) in enumerate(QA)]
    write_jsonl(tmp_path / "rows.jsonl", rows)
    theirs = trl_rows(rows, hf_tok, batch_size=3)
    ours = KTODataset(tmp_path / "rows.jsonl", tok, max_len=None)
    for i, ref in enumerate(theirs):
        assert ours[i]["input_ids"].tolist() + [NEWLINE] == ref["prompt_ids"] + ref["completion_ids"]
        assert bool(ours[i]["label"]) is ref["label"]
    # the same rows as TRL strings (a string prompt is one user message), as LLaMA-Factory's
    # messages + label, ShareGPT conversations + kto_tag: the same tokens
    other = [{"prompt": q, "completion": a, "label": i % 2 == 0} if i == 0 else
             {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "label": i % 2 == 0}
             if i == 1 else
             {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}], "kto_tag": i % 2 == 0}
             for i, (q, a, _) in enumerate(QA)]
    write_jsonl(tmp_path / "other.jsonl", other)
    again = KTODataset(tmp_path / "other.jsonl", tok, max_len=None)
    for i in range(len(QA)):
        assert torch.equal(again[i]["input_ids"], ours[i]["input_ids"]) and again[i]["label"] == ours[i]["label"]
    assert (again.desirable, again.undesirable) == (2, 1)


@pytest.mark.parametrize("line, needle", [
    ('{"prompt": "q", "completion": "a"}', "missing field 'label'"),
    ('{"prompt": "q", "completion": "a", "label": "yes"}', "'label' must be true or false"),
    ('{"prompt": "q", "completion": "a", "label": 1}', "'label' must be true or false"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}', "kto_tag"),
    ('{"messages": [{"role": "user", "content": "q"}], "label": true}', "last message must be the assistant"),
    ('{"text": "q"}', "not an unpaired row"),
])
def test_bad_rows_name_file_and_line(tok, tmp_path, line, needle):
    write_jsonl(tmp_path / "bad.jsonl", ['{"prompt": "q", "completion": "a", "label": true}', line])
    with pytest.raises(DataError, match=needle) as e:
        KTODataset(tmp_path / "bad.jsonl", tok)
    assert f"{tmp_path / 'bad.jsonl'}:2" in str(e.value)
