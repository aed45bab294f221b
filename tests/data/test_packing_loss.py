"""Through the model: the loss of a packed block equals the sum of the losses of its
documents run on their own — our packed blocks in models.qwen.Qwen (document_ids,
position_ids) against transformers' Qwen2 on each document separately."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data import PackedDataset, PackedSFTDataset, pad_collate
from tests.helpers import tiny_checkpoint

VOCAB = 320
EOT = 7  # stands in for <|endoftext|> in the tiny vocabulary


class ArrayDocs:
    """Documents given as arrays (the interface PackedDataset reads: lengths() and doc(k))."""

    def __init__(self, docs):
        self.docs = [np.asarray(d, dtype=np.uint32) for d in docs]

    def __len__(self):
        return len(self.docs)

    def lengths(self):
        return np.asarray([len(d) for d in self.docs], dtype=np.int64)

    def doc(self, k):
        return self.docs[k]


class ArraySFT:
    """SFT samples (ids, labels) with lengths(): the interface PackedSFTDataset reads."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def lengths(self):
        return np.asarray([len(s[0]) for s in self.samples], dtype=np.int64)

    def __getitem__(self, i):
        ids, labels = self.samples[i]
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from models.qwen import load

    path, hf = tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), "qwen2", seed=1)
    ours = load(path, dtype=torch.float32)
    ours.eval()
    return ours, hf


def hf_sum_loss(hf, ids, labels):
    """transformers' summed next-token loss of one sequence (0 when nothing is supervised)."""
    labels = torch.as_tensor(labels)
    n = int((labels[1:] != -100).sum())
    if n == 0:
        return 0.0
    with torch.no_grad():
        out = hf(torch.as_tensor(ids)[None], labels=labels[None])
    return float(out.loss) * n


def random_docs(seed, n_docs=7):
    g = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        body = g.integers(10, VOCAB, size=int(g.integers(1, 30)))
        docs.append(np.concatenate([body, [EOT]]))
    return docs


def test_packed_cpt_block_loss_is_sum_of_document_losses(models):
    ours, hf = models
    docs = random_docs(0)
    stream = np.concatenate(docs)
    owner = np.concatenate([[i] * len(d) for i, d in enumerate(docs)])
    T = 24
    blocks = PackedDataset(ArrayDocs(docs), block_size=T)
    batch = pad_collate([blocks[b] for b in range(len(blocks))])
    with torch.no_grad():
        total, n = ours(batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"],
                        document_ids=batch["document_ids"], reduction="sum")
    # reference: every piece of a document inside a block, run alone through transformers
    expected, expected_n = 0.0, 0
    for b in range(len(blocks)):
        ids, own = stream[b * T : (b + 1) * T], owner[b * T : (b + 1) * T]
        for d in np.unique(own):
            piece = ids[own == d].astype(np.int64)
            expected += hf_sum_loss(hf, piece, piece)
            expected_n += len(piece) - 1
    assert int(n) == expected_n
    assert float(total) == pytest.approx(expected, rel=1e-5)


def test_without_document_masking_the_sum_differs(models):
    """The check above can fail: plain concatenation attends across documents."""
    ours, _ = models
    docs = random_docs(0)
    masked = PackedDataset(ArrayDocs(docs), block_size=24)
    plain = PackedDataset(ArrayDocs(docs), block_size=24, document_mask=False)
    k = next(b for b in range(len(masked)) if masked[b]["document_ids"].max() > 0)  # a block with 2+ documents
    a = pad_collate([masked[k]])
    b = pad_collate([plain[k]])
    with torch.no_grad():
        la, _ = ours(a["input_ids"], labels=a["labels"], position_ids=a["position_ids"],
                     document_ids=a["document_ids"], reduction="sum")
        lb, _ = ours(b["input_ids"], labels=b["labels"], reduction="sum")
    assert abs(float(la) - float(lb)) > 1e-3


def test_packed_sft_block_loss_is_sum_of_sample_losses(models):
    ours, hf = models
    g = np.random.default_rng(3)
    samples = []
    for _ in range(6):
        n = int(g.integers(4, 14))
        ids = g.integers(10, VOCAB, size=n).tolist()
        cut = int(g.integers(1, n - 1))
        labels = [-100] * cut + ids[cut:]  # prompt masked, answer supervised
        samples.append((ids, labels))
    packed = PackedSFTDataset(ArraySFT(samples), block_size=32, pad_id=EOT)
    assert len(packed) < len(samples)
    batch = pad_collate([packed[b] for b in range(len(packed))])
    with torch.no_grad():
        total, n = ours(batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"],
                        document_ids=batch["document_ids"], reduction="sum")
    expected = sum(hf_sum_loss(hf, ids, labels) for ids, labels in samples)
    assert int(n) == sum(sum(1 for x in labels[1:] if x != -100) for _, labels in samples)
    assert float(total) == pytest.approx(expected, rel=1e-5)


def test_right_padded_batch_loss_is_sum_of_sample_losses(models):
    ours, hf = models
    g = np.random.default_rng(5)
    samples = []
    for n in (5, 11, 8):
        ids = g.integers(10, VOCAB, size=n).tolist()
        ids[-1] = EOT  # an eos label equal to the pad id must stay supervised
        samples.append((ids, [-100, -100] + ids[2:]))
    batch = pad_collate([ArraySFT(samples)[i] for i in range(3)], pad_id=EOT)
    assert batch["attention_mask"].tolist()[0] == [1] * 5 + [0] * 6
    assert batch["labels"][0, 4] == EOT and (batch["labels"][0, 5:] == -100).all()
    with torch.no_grad():
        total, _ = ours(batch["input_ids"], labels=batch["labels"], attention_mask=batch["attention_mask"], reduction="sum")
    expected = sum(hf_sum_loss(hf, ids, labels) for ids, labels in samples)
    assert float(total) == pytest.approx(expected, rel=1e-5)
