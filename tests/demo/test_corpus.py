"""The embedded-default corpus (demo/corpus.py) against Python's own introspection.

The corpus is built by parsing stdlib sources with `ast`; the references here import the
modules and use `inspect`, an independent path to the same docstrings and signatures.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

from demo import corpus as pydocs


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return pydocs.build(cache_dir=tmp_path_factory.mktemp("pydocs"))


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_parts_are_disjoint_and_split_by_package(built):
    domain = _rows(built.domain)
    general = _rows(built.general)
    assert len(domain) >= 50 and len(general) >= 100
    dnames = {r["name"] for r in domain}
    gnames = {r["name"] for r in general}
    assert not dnames & gnames
    assert "json" in dnames and "asyncio.queues" in dnames and "http.client" in dnames
    assert "collections" in gnames and "reference:for" in gnames
    # No test suites, GUI code or side-effect modules leak in.
    for name in dnames | gnames:
        top = name.split(".")[0]
        assert top not in ("test", "idlelib", "tkinter", "antigravity", "this"), name
        assert ".test." not in name and not name.endswith(".tests")
    assert built.stats["domain_documents"] == len(domain)


def test_documents_carry_the_real_docstrings(built):
    import json as json_mod

    domain = {r["name"]: r["text"] for r in _rows(built.domain)}
    # The reference: the docstring as Python itself reports it (inspect.getdoc, imported module).
    for obj, module in ((json_mod.dumps, "json"), (json_mod.JSONDecoder.decode, "json.decoder")):
        doc = inspect.getdoc(obj)
        assert doc.split("\n\n")[0] in domain[module]
    ref_topic = __import__("pydoc_data.topics", fromlist=["topics"]).topics["for"].strip()
    general = {r["name"]: r["text"] for r in _rows(built.general)}
    assert general["reference:for"] == ref_topic


def _qa(rows, question):
    hits = [r for r in rows if r["messages"][0]["content"] == question]
    assert hits, question
    return hits[0]["messages"][1]["content"]


def test_sft_answers_match_inspect(built):
    import json as json_mod
    import urllib.parse

    rows = _rows(built.sft_train) + _rows(built.sft_eval)
    for r in rows:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert r["messages"][1]["content"].strip()
    for qual, obj in (("json.dumps", json_mod.dumps), ("urllib.parse.quote", urllib.parse.quote)):
        paras = [" ".join(l.strip() for l in p.splitlines()) for p in inspect.getdoc(obj).split("\n\n")]
        # A one-line first paragraph (quote's is a usage example) is followed by the second.
        expected = paras[0] if len(paras[0]) >= 40 else paras[0] + " " + paras[1]
        assert _qa(rows, f"What does the function `{qual}` do?") == expected
        assert _qa(rows, f"What is the signature of `{qual}`?") == f"`{qual}{inspect.signature(obj)}`"


def test_held_out_split_is_by_object_and_stable(built):
    train = _rows(built.sft_train)
    evals = _rows(built.sft_eval)
    assert len(evals) > 10 and len(train) > 10 * len(evals) // 2
    assert not {r["source"] for r in train} & {r["source"] for r in evals}
    frac = len(evals) / (len(train) + len(evals))
    assert 0.01 < frac < 0.15


def test_build_is_deterministic_and_cached(built, tmp_path):
    again = pydocs.build(cache_dir=tmp_path)
    for attr in ("domain", "general", "sft_train", "sft_eval"):
        assert getattr(again, attr).read_bytes() == getattr(built, attr).read_bytes()
    mtime = again.domain.stat().st_mtime_ns
    third = pydocs.build(cache_dir=tmp_path)  # cached: returns the same files, untouched
    assert third.domain == again.domain and third.domain.stat().st_mtime_ns == mtime
    assert not [p for p in tmp_path.rglob(".pydocs-*")]  # no temp dirs left behind


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("QWEN_TUNE_CACHE", str(tmp_path))
    assert pydocs.cache_root() == tmp_path


def test_missing_stdlib_dir_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pydocs.build(cache_dir=tmp_path, root=tmp_path / "nope")


def test_parse_module_never_executes(tmp_path):
    src = 'raise SystemExit("executed")\ndef f(a, b=1):\n    """Adds the two numbers a and b together, returning the sum."""\n'
    entries = pydocs.parse_module("m", src)
    assert [e.qualname for e in entries] == ["m.f"]
    assert entries[0].signature == "m.f(a, b=1)"
