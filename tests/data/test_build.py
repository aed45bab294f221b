"""A stage's datasets built from Python (data/build.py, no cli): the held-out split against an
independent twin of the rule (a seeded permutation of whole documents / samples), the blocks
against the tokenizer on each document, and the rank-0-first barrier on two ranks."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest

import data
from tests.data.conftest import write_jsonl

EOT = 151643
DOCS = [f"Document {i}: " + "words about sorting and hashing. " * (i % 4 + 1) for i in range(12)]


@pytest.fixture
def corpus_file(tmp_path):
    return write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in DOCS])


def held_out_twin(n: int, fraction: float, seed: int):
    """(train, held-out) indices by the documented rule, written out independently."""
    n_val = min(n - 1, max(1, int(round(fraction * n))))
    perm = np.random.default_rng(seed).permutation(n)
    return sorted(perm[n_val:].tolist()), sorted(perm[:n_val].tolist())


def stream_of(blocks):
    return [t for b in range(len(blocks)) for t in blocks[b]["input_ids"].tolist()]


def test_cpt_datasets_split_and_blocks(tok, corpus_file):
    train, held_out, info = data.cpt_datasets([corpus_file], tok, block_size=16, eval_fraction=0.25, seed=3,
                                              progress=False)
    train_idx, val_idx = held_out_twin(len(DOCS), 0.25, 3)
    train_stream = [t for i in train_idx for t in tok.encode(DOCS[i]) + [EOT]]
    assert stream_of(train) == train_stream[: len(train) * 16]
    assert len(train) == len(train_stream) // 16
    val_stream = [t for i in val_idx for t in tok.encode(DOCS[i]) + [EOT]]
    assert stream_of(held_out) == val_stream[: len(held_out) * 16]
    assert f"train {len(train_idx)} documents -> {len(train)} blocks of 16" in info
    # evaluate.py's held-out documents are exactly these
    docs = data.cpt_held_out_documents([corpus_file], tok, eval_fraction=0.25, seed=3, progress=False)
    assert [d.tolist() for d in docs] == [tok.encode(DOCS[i]) + [EOT] for i in val_idx]
    # same files, fraction and seed: the same blocks
    again = data.cpt_datasets([corpus_file], tok, block_size=16, eval_fraction=0.25, seed=3, progress=False)
    assert stream_of(again.train) == stream_of(train) and stream_of(again.held_out) == stream_of(held_out)
    none = data.cpt_datasets([corpus_file], tok, block_size=16, progress=False)
    assert none.held_out is None and "no held-out split" in none.info


class NoTokenising:
    """The tokenizer of a rank that must only read the cache: tokenising is an error."""

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def encode_batch(self, *args, **kwargs):
        raise AssertionError("this rank tokenised instead of reading rank 0's cache")


def test_barrier_rank0_fills_the_cache_first(tok, corpus_file, private_cache):
    calls = []

    def cached():
        return len(list((private_cache / "tokens").glob("*"))) if (private_cache / "tokens").is_dir() else 0

    def fake_main_process_first(rank):
        @contextmanager
        def barrier():
            calls.append((rank, "enter", cached()))
            yield
            calls.append((rank, "exit", cached()))
        return barrier

    # rank 0 runs the block first; rank 1 enters once rank 0 has left it, and reads the cache
    rank0 = data.cpt_datasets([corpus_file], tok, block_size=16, eval_fraction=0.25, seed=3, progress=False,
                              main_process_first=fake_main_process_first(0))
    rank1 = data.cpt_datasets([corpus_file], NoTokenising(tok), block_size=16, eval_fraction=0.25, seed=3,
                              progress=False, main_process_first=fake_main_process_first(1))
    assert calls == [(0, "enter", 0), (0, "exit", 1), (1, "enter", 1), (1, "exit", 1)]
    assert stream_of(rank1.train) == stream_of(rank0.train)
    assert stream_of(rank1.held_out) == stream_of(rank0.held_out)


RECORDS = [{"instruction": f"Question {i}?", "output": f"Answer number {i}."} for i in range(10)]


def test_sft_datasets_split_and_eval_file(tok, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    train, held_out, info = data.sft_datasets([path], tok, max_len=64, eval_fraction=0.3, seed=5)
    train_idx, val_idx = held_out_twin(len(RECORDS), 0.3, 5)

    def samples(ds):
        return [(ds[i]["input_ids"].tolist(), ds[i]["labels"].tolist()) for i in range(len(ds))]

    encoded = [tuple(data.encode_chat(r, tok, max_len=64)) for r in RECORDS]
    assert samples(train) == [encoded[i] for i in train_idx]
    assert samples(held_out) == [encoded[i] for i in val_idx]
    assert info.startswith(f"{len(train_idx)} training samples") and f"{len(val_idx)} held-out samples" in info
    eval_path = write_jsonl(tmp_path / "val.jsonl", RECORDS[:2])
    train, held_out, info = data.sft_datasets([path], tok, max_len=64, eval_path=eval_path, eval_fraction=0.3)
    assert samples(train) == encoded and samples(held_out) == encoded[:2]
    assert info.endswith(f"2 held-out samples from {eval_path}")
    assert data.sft_datasets([path], tok, max_len=64).held_out is None


def test_preference_datasets_split(tok, tmp_path):
    pairs = [{"prompt": f"Name colour {i}.", "chosen": f"Blue {i}.", "rejected": "Seven."} for i in range(8)]
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    train, held_out, info = data.preference_datasets([path], tok, max_len=64, eval_fraction=0.25, seed=1)
    train_idx, val_idx = held_out_twin(len(pairs), 0.25, 1)
    full = data.PreferenceDataset([str(path)], tok, max_len=64)

    def rows(ds):
        return [ds[i]["chosen_input_ids"].tolist() for i in range(len(ds))]

    assert rows(train) == [rows(full)[i] for i in train_idx] and rows(held_out) == [rows(full)[i] for i in val_idx]
    assert info == f"{len(train_idx)} training pairs ({full.report.summary()}), {len(val_idx)} held-out pairs"


def test_held_out_questions(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [
        "not json",
        [1, 2],
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Parts "}, {"type": "text", "text": "joined"}]},
                      {"role": "assistant", "content": "a"}]},
        {"instruction": "Do this", "input": "with that"},
        {"messages": [{"role": "user", "content": "Third"}]},
    ])
    assert data.held_out_questions(path, 2) == ["Parts joined", "Do this\n\nwith that"]
    assert data.held_out_questions(path, 9) == ["Parts joined", "Do this\n\nwith that", "Third"]
