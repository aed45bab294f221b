"""CPT data: tokenising (against the tokenizer on each document), the token cache, packing
with <|endoftext|> after every document, per-document ids/positions, splits, bad input."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

import data
from data import DataError, load_corpus, pack_documents
from tests.data.conftest import write_jsonl

EOT = 151643

DOCS = [
    "A B-tree keeps keys sorted and balanced.\nEach node holds many keys.",
    "Quicksort picks a pivot.\n\n    def qsort(xs): ...\n",
    "编译器把源代码翻译成机器码。",
    "TCP guarantees in-order delivery; UDP does not.",
    "Short.",
    "Paging maps virtual pages to physical frames. " * 20,
]


@pytest.fixture
def corpus_dir(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text(DOCS[0], encoding="utf-8")
    write_jsonl(d / "b.jsonl", [{"text": DOCS[1]}, {"text": DOCS[2], "meta": 1}])
    write_jsonl(d / "sub" / "c.jsonl.gz", [{"text": t} for t in DOCS[3:]], gz=True)
    (d / "notes.md").write_text("ignored: unsupported suffix")
    return d


def expected_stream(tok, docs):
    return [t for doc in docs for t in tok.encode(doc) + [EOT]]


def test_every_document_tokenised_and_followed_by_endoftext(tok, corpus_dir):
    corpus = load_corpus(corpus_dir, tok, progress=False)
    assert len(corpus) == len(DOCS)
    for i, doc in enumerate(DOCS):
        assert corpus.doc(i).tolist() == tok.encode(doc) + [EOT]
    stream = expected_stream(tok, DOCS)
    assert corpus.n_tokens == len(stream)
    blocks = pack_documents(corpus, block_size=16, document_mask=False)
    got = [t for b in range(len(blocks)) for t in blocks[b]["input_ids"].tolist()]
    assert got == stream[: len(blocks) * 16]
    assert blocks.dropped_tokens == len(stream) % 16
    assert set(blocks[0]) == {"input_ids", "labels"}
    assert blocks[0]["labels"].tolist() == blocks[0]["input_ids"].tolist()


def test_document_ids_positions_and_labels(tok, corpus_dir):
    corpus = load_corpus(corpus_dir, tok, progress=False)
    stream = expected_stream(tok, DOCS)
    doc_of = [i for i, doc in enumerate(DOCS) for _ in range(len(tok.encode(doc)) + 1)]
    T = 24
    blocks = pack_documents(corpus, block_size=T)
    for b in range(len(blocks)):
        item = blocks[b]
        ids = stream[b * T : (b + 1) * T]
        owner = doc_of[b * T : (b + 1) * T]
        # reference: fragment k = k-th run of equal owners; positions count within the run
        frag, pos, labels = [], [], []
        for j, o in enumerate(owner):
            new = j == 0 or o != owner[j - 1]
            frag.append(0 if j == 0 else frag[-1] + new)
            pos.append(0 if new else pos[-1] + 1)
            labels.append(-100 if new else ids[j])
        assert item["input_ids"].tolist() == ids
        assert item["document_ids"].tolist() == frag
        assert item["position_ids"].tolist() == pos
        assert item["labels"].tolist() == labels
        for key in item:
            assert item[key].dtype == np.int64 or str(item[key].dtype) == "torch.int64"


def test_cache_second_run_does_not_tokenise(tok, corpus_dir, private_cache, monkeypatch):
    first = load_corpus(corpus_dir, tok, progress=False)
    assert any(private_cache.rglob("tokens.u32"))
    assert first.files[0].tokens.dtype == np.uint32

    def boom(*a, **k):
        raise AssertionError("tokenised again despite the cache")

    monkeypatch.setattr(type(tok), "encode_batch", boom)
    again = load_corpus(corpus_dir, tok, progress=False)
    assert [again.doc(i).tolist() for i in range(len(again))] == [first.doc(i).tolist() for i in range(len(first))]
    # an edited file is a new cache entry
    (corpus_dir / "a.txt").write_text("changed text", encoding="utf-8")
    with pytest.raises(AssertionError, match="tokenised again"):
        load_corpus(corpus_dir, tok, progress=False)


def test_cache_dir_argument_overrides_env(tok, corpus_dir, tmp_path, private_cache):
    load_corpus(corpus_dir / "a.txt", tok, cache_dir=tmp_path / "elsewhere", progress=False)
    assert any((tmp_path / "elsewhere").rglob("meta.json")) and not private_cache.exists()
    assert data.cache_root() == private_cache


def test_split_for_encoding_gives_identical_ids(tok):
    text = ("第一段。\nSecond line  with  spaces\n\n\tindented code();\n" * 40 + "tail") * 3
    pieces = data.split_for_encoding(text, max_chars=50)
    assert len(pieces) > 10 and "".join(pieces) == text
    assert [t for p in pieces for t in tok.encode(p)] == tok.encode(text)


def test_large_document_tokenised_in_pieces(tok, tmp_path, monkeypatch):
    import data.cpt as cpt

    monkeypatch.setattr(cpt, "CHUNK_CHARS", 64)
    monkeypatch.setattr(cpt, "BATCH_CHARS", 256)
    text = "\n".join(f"Line {i}: words and 数字 {i * 7}" for i in range(300))
    (tmp_path / "big.txt").write_text(text, encoding="utf-8")
    corpus = load_corpus(tmp_path / "big.txt", tok, progress=False)
    assert corpus.doc(0).tolist() == tok.encode(text) + [EOT]


def test_validation_split_by_document_is_deterministic(tok, corpus_dir):
    corpus = load_corpus(corpus_dir, tok, progress=False)
    train, val = corpus.split(val_fraction=0.34, seed=7)
    assert len(val) == 2 and len(train) == 4
    assert sorted(train.indices.tolist() + val.indices.tolist()) == list(range(6))
    train2, val2 = corpus.split(val_fraction=0.34, seed=7)
    assert val.indices.tolist() == val2.indices.tolist()
    assert len({tuple(corpus.split(0.34, seed=s)[1].indices.tolist()) for s in range(10)}) > 1
    blocks = pack_documents(val, block_size=4)
    stream = [t for i in val.indices for t in corpus.doc(int(i)).tolist()]
    assert blocks[0]["input_ids"].tolist() == stream[:4]


def test_text_field_and_glob(tok, tmp_path):
    write_jsonl(tmp_path / "x.jsonl", [{"body": "first"}, {"body": "second"}])
    (tmp_path / "y.txt").write_text("text file")
    corpus = load_corpus(tmp_path, tok, glob="*.jsonl", text_field="body", progress=False)
    assert len(corpus) == 2 and corpus.doc(1).tolist() == tok.encode("second") + [EOT]


# ---------------------------------------------------------------------- bad input
def test_missing_text_field_names_file_line_and_field(tok, tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, {"content": "no text"}, {"text": "ok too"}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: missing field 'text'"):
        load_corpus(tmp_path / "d.jsonl", tok, progress=False)
    corpus = load_corpus(tmp_path / "d.jsonl", tok, on_error="skip", progress=False)
    assert len(corpus) == 2
    report = corpus.report()
    assert report.skipped["missing-field"] == 1 and report.read == 3 and report.kept == 2


def test_malformed_json_line(tok, tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, {"text": "ok"}, '{"text": "unterminated}'])
    with pytest.raises(DataError, match=r"d\.jsonl:3: malformed JSON"):
        load_corpus(tmp_path / "d.jsonl", tok, progress=False)
    assert load_corpus(tmp_path / "d.jsonl", tok, on_error="skip", progress=False).report().skipped["malformed-json"] == 1


def test_non_utf8_text_file_names_line(tok, tmp_path):
    (tmp_path / "w.txt").write_bytes("line one\nline two\nna\u00efve\n".encode("cp1252"))
    with pytest.raises(DataError, match=r"w\.txt:3: not UTF-8 text \(byte 0xef at column 3\)"):
        load_corpus(tmp_path / "w.txt", tok, progress=False)


def test_empty_inputs(tok, tmp_path):
    (tmp_path / "e.txt").write_text("  \n")
    with pytest.raises(DataError, match=r"e\.txt: empty file"):
        load_corpus(tmp_path / "e.txt", tok, progress=False)
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataError, match=r"e\.jsonl: empty file"):
        load_corpus(tmp_path / "e.jsonl", tok, progress=False)
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match="directory has no files"):
        load_corpus(tmp_path / "none", tok, progress=False)
    with gzip.open(tmp_path / "z.jsonl.gz", "wb") as f:
        f.write(b"")
    with pytest.raises(DataError, match="empty file"):
        load_corpus(tmp_path / "z.jsonl.gz", tok, progress=False)
    write_jsonl(tmp_path / "bad.jsonl", [{"x": 1}])
    with pytest.raises(DataError, match="no usable documents"):
        load_corpus(tmp_path / "bad.jsonl", tok, on_error="skip", progress=False)


def test_corpus_smaller_than_one_block(tok, tmp_path):
    (tmp_path / "s.txt").write_text("tiny")
    corpus = load_corpus(tmp_path / "s.txt", tok, progress=False)
    with pytest.raises(DataError, match="fewer than one block of 2048"):
        pack_documents(corpus, 2048)


def test_damaged_cache_is_rebuilt(tok, corpus_dir, private_cache):
    first = load_corpus(corpus_dir / "a.txt", tok, progress=False)
    (first.files[0].path / "tokens.u32").write_bytes(b"\x00\x00")  # truncated
    again = load_corpus(corpus_dir / "a.txt", tok, progress=False)
    assert again.doc(0).tolist() == tok.encode(DOCS[0]) + [EOT]
