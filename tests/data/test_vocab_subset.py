"""Compact-vocabulary pretraining: remapping, and growing back to the full vocabulary with
the same logits on the used ids (against the small model) and zero rows elsewhere."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from data import vocab
from models.qwen import Qwen, QwenConfig
from tests.helpers import max_rel_err

FULL = 1000


def config(tied):
    return QwenConfig(vocab_size=FULL, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)


def blocks():
    g = torch.Generator().manual_seed(0)
    used = torch.tensor([3, 17, 99, 400, 401, 998])
    items = []
    for _ in range(4):
        ids = used[torch.randint(0, len(used), (12,), generator=g)]
        labels = ids.clone()
        labels[:2] = -100
        items.append({"input_ids": ids, "labels": labels, "position_ids": torch.arange(12)})
    return items, used


def test_used_ids_and_remapping():
    items, used = blocks()
    ids = vocab.used_ids([items], always=[5])
    assert ids.tolist() == sorted(set(used.tolist()) | {5})
    remapped = vocab.RemappedDataset(items, ids)
    item = remapped[1]
    assert torch.equal(ids[item["input_ids"]], items[1]["input_ids"])  # compact -> real is ids[k]
    assert (item["labels"][:2] == -100).all()
    assert torch.equal(ids[item["labels"][2:]], items[1]["labels"][2:])
    assert torch.equal(item["position_ids"], items[1]["position_ids"])
    with pytest.raises(ValueError, match="outside the compact vocabulary"):
        vocab.RemappedDataset([{"input_ids": torch.tensor([4])}], ids)[0]


@pytest.mark.parametrize("tied", [True, False])
def test_expanded_model_gives_the_small_models_logits_on_used_ids(tied):
    items, _ = blocks()
    ids = vocab.used_ids([items], always=[5])
    torch.manual_seed(0)
    small = Qwen(replace(config(tied), vocab_size=vocab.padded_rows(len(ids)))).eval()
    big = vocab.expand_vocabulary(small, ids, config(tied)).eval()
    assert big.config.vocab_size == FULL and big.is_tied == tied
    real = items[0]["input_ids"][None]
    compact = vocab.RemappedDataset(items, ids)[0]["input_ids"][None]
    with torch.no_grad():
        got, ref = big(real), small(compact)
    assert max_rel_err(got[..., ids], ref[..., : len(ids)]) <= 1e-6
    unused = torch.ones(FULL, dtype=torch.bool)
    unused[ids] = False
    assert (got[..., unused] == 0).all()  # zero rows: logit 0 until trained down
    with pytest.raises(ValueError, match="more than vocab_size"):
        vocab.expand_vocabulary(small, ids, replace(config(tied), hidden_size=64))


def test_unused_row_keeps_the_unused_ids_improbable():
    # A small model whose final hidden states share a direction (RMSNorm weight with a large
    # constant component): the shared row must give the unused ids logits <= -12 at nearly
    # every position, where zero rows give them 0.
    items, _ = blocks()
    ids = vocab.used_ids([items])
    torch.manual_seed(0)
    small = Qwen(replace(config(True), vocab_size=vocab.padded_rows(len(ids)))).eval()
    with torch.no_grad():
        small.model.norm.weight.add_(3.0)
    compact = vocab.RemappedDataset(items, ids)
    batches = [{"input_ids": torch.stack([compact[i]["input_ids"] for i in range(4)])}]
    fill = vocab.unused_row(small, batches)
    assert fill is not None
    big = vocab.expand_vocabulary(small, ids, config(True), fill=fill).eval()
    unused = torch.ones(FULL, dtype=torch.bool)
    unused[ids] = False
    with torch.no_grad():
        logits = big(torch.stack([items[i]["input_ids"] for i in range(4)]))
    low = logits[..., unused].amax(-1)  # the shared row: one value per position
    assert (low <= -12.0 + 1e-4).float().mean() >= 0.95
    with torch.no_grad():  # the used ids are unchanged by the fill
        ref = small(batches[0]["input_ids"])
    assert max_rel_err(logits[..., ids], ref[..., : len(ids)]) <= 1e-6
