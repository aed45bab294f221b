"""Compact-vocabulary pretraining: remapping, and growing back to the full vocabulary with
the same logits on the used ids (against the small model) and zero rows elsewhere."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

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
def test_grown_model_is_the_compact_models_function(tied):
    # The compact model trains with the shared row counted log(#unused) times; the grown model
    # has that row at every unused id. Same logits on used ids, and the same loss: the
    # full-vocabulary softmax (computed by the plain F.cross_entropy here) equals the compact one.
    items, _ = blocks()
    ids = vocab.used_ids([items], always=[5])
    torch.manual_seed(0)
    small = Qwen(replace(config(tied), vocab_size=vocab.compact_rows(len(ids)))).eval()
    small.logit_offset = vocab.compact_logit_offset(len(ids), FULL, small.config.vocab_size)
    big = vocab.expand_vocabulary(small, ids, config(tied)).eval()
    assert big.config.vocab_size == FULL and big.is_tied == tied and big.logit_offset is None
    real = torch.stack([items[i]["input_ids"] for i in range(4)])
    labels = torch.stack([items[i]["labels"] for i in range(4)])
    compact = vocab.RemappedDataset(items, ids)
    c_ids = torch.stack([compact[i]["input_ids"] for i in range(4)])
    c_labels = torch.stack([compact[i]["labels"] for i in range(4)])
    with torch.no_grad():
        logits = big(real)
        ref = small.hidden_states(c_ids) @ small.lm_head.weight.t()
        compact_loss = small(c_ids, labels=c_labels)
    assert max_rel_err(logits[..., ids], ref[..., : len(ids)]) <= 1e-6
    unused = torch.ones(FULL, dtype=torch.bool)
    unused[ids] = False
    assert torch.allclose(logits[..., unused], ref[..., len(ids) : len(ids) + 1].expand_as(logits[..., unused]))
    full_loss = F.cross_entropy(logits[:, :-1].reshape(-1, FULL), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert abs(float(full_loss) - float(compact_loss)) <= 1e-5 * float(full_loss)
    # Control: without the log(#unused) offset the compact loss is a different (lower) number.
    small.logit_offset[len(ids)] = 0.0
    with torch.no_grad():
        assert float(small(c_ids, labels=c_labels)) < float(full_loss) - 1e-3
    with pytest.raises(ValueError, match="more than vocab_size"):
        vocab.expand_vocabulary(small, ids, replace(config(tied), hidden_size=64))


def test_logit_offset_rows():
    off = vocab.compact_logit_offset(3, 100, 64)
    assert off[:3].tolist() == [0.0, 0.0, 0.0]
    assert abs(float(off[3]) - math.log(97)) < 1e-6 and torch.isinf(off[4:]).all() and (off[4:] < 0).all()
    with pytest.raises(ValueError):
        vocab.compact_logit_offset(3, 100, 3)
