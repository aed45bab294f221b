"""Vocabulary extension (data.vocab and the Tokenizer's text tokens) against transformers.

References: transformers' tokenizer loading the files we write (the ids of every text, and
the corpus token counts the mining report claims), transformers' Qwen2 model loading the
checkpoints we write (logits, greedy generation), and the embedding rows of the tiny HF
model itself (the mean-of-pieces initialisation).

The model tests use a small vocabulary: Qwen's first 1000 BPE ranks plus its three control
tokens (1003 ids) in tiny models with 1024 rows, so 21 padding rows are free.

Tolerances: a mean of a few rows (atol 1e-7) was observed bit-equal; logits of a reloaded or
resized model against the same weights (rtol = atol = 1e-5) at most 0.028 of the bound (36x).
"""

from __future__ import annotations

import json
import shutil
import unicodedata

import pytest
import torch

import lora
from data import vocab
from models.qwen import generate, load, save
from models.qwen.tokenizer import AddedToken, Tokenizer, TokenizerError, default_tiktoken_path, load_tiktoken_ranks
from tests.examples.conftest import assert_usage_error, run_script
from tests.helpers import tiny_checkpoint
from train import AdamW, param_groups

ROWS = 1024
NEW = [" asyncio", " getaddrinfo", "数据库系统"]


@pytest.fixture(scope="module")
def small_tok():
    ranks = {b: r for b, r in load_tiktoken_ranks(default_tiktoken_path()).items() if r < 1000}
    controls = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    return Tokenizer(ranks, [AddedToken(1000 + i, t) for i, t in enumerate(controls)])


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """Tiny random transformers Qwen2 checkpoints with 1024 rows: {tied: (path, hf_model)}."""
    root = tmp_path_factory.mktemp("vocab_ckpts")
    return {tied: tiny_checkpoint(root / f"tied{int(tied)}", vocab_size=ROWS, tie_word_embeddings=tied, seed=3 + tied)
            for tied in (True, False)}


def hf_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def train_steps(model, ids, steps, lr=2e-2, weight_decay=0.1):
    opt = AdamW(param_groups(model, weight_decay), lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in range(steps):
        loss = model(ids, labels=ids)
        loss.backward()
        lora.check_gradients(model)
        opt.step()
        opt.zero_grad()
    model.eval()
    return float(loss.detach())


# ---------------------------------------------------------------------- tokenizer: text tokens
def test_text_tokens_match_transformers_in_every_file_layout(small_tok, tmp_path):
    new = small_tok.with_added_tokens(["abc", "abcd", "bcde", "cd", " asyncio", "数据库系统", "<|tool|>"])
    assert len(small_tok) == 1003 and len(new) == 1010
    assert new.text_tokens == {"abc": 1003, "abcd": 1004, "bcde": 1005, "cd": 1006, " asyncio": 1007,
                               "数据库系统": 1008, "<|tool|>": 1009}
    full = new.save_pretrained(tmp_path / "full")  # qwen.tiktoken is what our loader reads first
    layouts = {"tiktoken": full, "tokenizer.json": tmp_path / "tj", "vocab.json": tmp_path / "vm"}
    for name, files in (("tokenizer.json", ("tokenizer.json", "tokenizer_config.json")),
                        ("vocab.json", ("vocab.json", "merges.txt", "tokenizer_config.json"))):
        layouts[name].mkdir()
        for f in files:
            shutil.copy(full / f, layouts[name] / f)
    texts = [
        "abcde xabcdex bcdey cdcd abab",  # overlapping tokens: leftmost-longest, as HF
        "import asyncio\nasyncio.run(main()) # asyncio",
        "使用数据库系统。数据库系统管理员",
        "<|im_start|>user\nabcd<|tool|><|im_end|>\n",
        "e\u0301 cafe\u0301 abc",  # NFC before matching
    ]
    for name, path in layouts.items():
        ours, theirs = Tokenizer.from_pretrained(path), hf_tokenizer(path)
        assert ours.text_tokens == new.text_tokens and len(theirs) == len(new), name
        for text in texts:
            ids = new.encode(text, allowed_special="all")
            assert ours.encode(text, allowed_special="all") == ids, (name, text)
            assert theirs.encode(text, add_special_tokens=False) == ids, (name, text)
    # Text tokens are text: matched without allowed_special, unlike control tokens.
    assert new.encode(" asyncio<|im_end|>")[0] == 1007
    assert 1002 not in new.encode(" asyncio<|im_end|>")


def test_text_tokens_decode_batch_chat_and_cache_key(small_tok):
    new = small_tok.with_added_tokens(NEW)
    texts = ["import asyncio, socket\nsocket.getaddrinfo(host) 数据库系统!", "", "no new tokens here"]
    for text in texts:
        assert new.decode(new.encode(text)) == text
    assert new.encode_batch(texts) == [new.encode(t) for t in texts]
    ids = new.encode(" asyncio") + [new.im_end_id]
    assert new.decode(ids, skip_special_tokens=True) == " asyncio"  # control dropped, text token kept
    assert new.token_bytes(1003) == b" asyncio"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "use 数据库系统"}]
    chat, mask = new.apply_chat_template(messages, tokenize=True, return_assistant_mask=True)
    assert 1005 in chat and mask[chat.index(1005)] == 1
    assert new.decode([i for i, m in zip(chat, mask) if m]) == "use 数据库系统<|im_end|>"
    # token caches are keyed on the fingerprint: new tokens -> a new key; the old tokenizer is untouched
    assert new.fingerprint() != small_tok.fingerprint()
    assert new.fingerprint() == small_tok.with_added_tokens(NEW).fingerprint()
    assert len(small_tok) == 1003 and not small_tok.text_tokens


def test_new_token_errors(tok):
    cases = [
        ([""], "is empty"),
        ([" asyncio"], r"already exists \(BPE token id 44918\)"),
        (["<|im_end|>"], r"collides with the special token '<\|im_end\|>' \(id 151645\)"),
        (["<tool_call>"], "collides with the special token '<tool_call>'"),
        (["x<|endoftext|>y"], r"collides with the special token '<\|endoftext\|>' \(id 151643\), which it contains"),
        (["wsgiref", "wsgiref"], "listed twice"),
        (["cafe\u0301"], "not NFC-normalised"),
        (["two\nlines"], "line break"),
        ([], "no new tokens"),
    ]
    for tokens, message in cases:
        with pytest.raises(TokenizerError, match=message):
            tok.with_added_tokens(tokens)
    ext = tok.with_added_tokens(["wsgiref"])
    with pytest.raises(TokenizerError, match=r"already exists \(added token id 151665\)"):
        ext.with_added_tokens(["wsgiref"])
    with pytest.raises(TypeError, match="not one string"):
        tok.with_added_tokens("wsgiref")
    with pytest.raises(TokenizerError, match="is empty"):
        vocab.measure_tokens(["some text"], tok, ["wsgiref", ""])


# ---------------------------------------------------------------------- rows: padding first, then growth
def test_rows_take_padding_first_then_grow_with_mean_init(small_tok, tiny_dirs, tmp_path):
    small_dir = small_tok.save_pretrained(tmp_path / "small")
    theirs = hf_tokenizer(small_dir)  # independent pieces for the reference means
    for tied, (path, ref) in tiny_dirs.items():
        model = load(path, dtype=torch.float32)
        E, H = ref.model.embed_tokens.weight.detach(), ref.lm_head.weight.detach()
        ext = vocab.add_tokens(model, small_tok, NEW)
        assert ext.ids == [1003, 1004, 1005] and not ext.grew and ext.rows_after == ROWS
        assert model.config.vocab_size == ROWS and model.is_tied == tied
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        for token, idx in zip(NEW, ext.ids):
            pieces = theirs.encode(token, add_special_tokens=False)
            assert len(pieces) > 1
            torch.testing.assert_close(emb[idx], E[pieces].mean(0), rtol=0, atol=1e-7)
            torch.testing.assert_close(head[idx], H[pieces].mean(0), rtol=0, atol=1e-7)  # tied: H is E
        assert torch.equal(emb[:1003], E[:1003]) and torch.equal(emb[1006:], E[1006:])
        assert torch.equal(head[:1003], H[:1003])

        # 30 more: 1036 tokens > 1024 rows -> the matrices grow to 1152 (next multiple of 128)
        before_e, before_h = emb.detach().clone(), head.detach().clone()
        more = [f" domain{i:02d}" for i in range(30)]
        with pytest.warns(UserWarning, match="grow to 1152 rows"):
            ext2 = vocab.add_tokens(model, ext.tokenizer, more)
        assert ext2.grew and (ext2.rows_before, ext2.rows_after) == (ROWS, 1152)
        assert ext2.ids == list(range(1006, 1036)) and len(ext2.tokenizer) == 1036
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        assert emb.shape == head.shape == (1152, 48) and model.config.vocab_size == 1152
        assert model.is_tied == tied and (head is emb) == tied
        assert torch.equal(emb[:1006], before_e[:1006]) and torch.equal(head[:1006], before_h[:1006])
        pieces = ext.tokenizer.encode(" domain00")
        for now, then in ((emb, before_e), (head, before_h)):  # new padding rows: the mean of the old ids' rows
            torch.testing.assert_close(now[1036:], then[:1006].mean(0).expand(116, -1), rtol=0, atol=1e-7)
            torch.testing.assert_close(now[1006], then[pieces].mean(0), rtol=0, atol=1e-7)

        out = save(model, tmp_path / f"grown{int(tied)}", tokenizer=ext2.tokenizer)
        config = json.loads((out / "config.json").read_text())
        assert config["vocab_size"] == 1152 and config["tie_word_embeddings"] == tied
        ids = torch.tensor([ext2.tokenizer.encode("import asyncio as domain07 数据库系统")])
        assert {1003, 1005, 1013} <= set(ids[0].tolist())
        with torch.no_grad():
            logits = model(ids)
            assert torch.equal(load(out, dtype=torch.float32)(ids), logits)
            torch.testing.assert_close(hf_model(out)(ids).logits, logits, rtol=1e-5, atol=1e-5)
        assert hf_tokenizer(out).encode("import asyncio as domain07 数据库系统", add_special_tokens=False) == ids[0].tolist()


# ---------------------------------------------------------------------- training the new rows
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_new_rows_train_generate_and_survive_merge_save_reload(small_tok, tiny_dirs, tmp_path, tied):
    path, _ = tiny_dirs[tied]
    model = load(path, dtype=torch.float32)
    E0 = model.model.embed_tokens.weight.detach().clone()
    H0 = model.lm_head.weight.detach().clone()
    ext = vocab.add_tokens(model, small_tok, NEW)
    init = model.model.embed_tokens.weight[ext.ids].detach().clone()
    lora.inject(model, r=4, alpha=8)
    params = vocab.train_new_rows(model, ext.ids)
    assert len(params) == (1 if tied else 2) and model.is_tied == tied
    tok = ext.tokenizer
    text = "import asyncio"
    batch = torch.tensor([tok.encode(text)] * 2)
    assert batch[0, -1].item() == 1003
    torch.manual_seed(0)
    train_steps(model, batch, steps=20, weight_decay=0.1)  # decay on: old rows must not move anyway

    prompt = torch.tensor([tok.encode("import")])
    assert generate(model, prompt, max_new_tokens=1, temperature=0.0)[0, -1].item() == 1003
    # old rows (trained tokens and padding alike) bit-identical, new rows trained
    w = model.model.embed_tokens.weight
    assert torch.equal(w[:1003], E0[:1003]) and torch.equal(w[1006:], E0[1006:])
    assert not torch.equal(params[0].detach(), init)

    probe = torch.tensor([tok.encode("import asyncio; call getaddrinfo(数据库系统)")])
    assert {1003, 1004, 1005} <= set(probe[0].tolist())
    with torch.no_grad():
        trained = model(probe)
    vocab.merge(model)
    assert type(model.model.embed_tokens) is torch.nn.Embedding and not lora.has_adapters(model)
    assert model.is_tied == tied
    emb, head = model.model.embed_tokens.weight, model.lm_head.weight
    assert torch.equal(emb[:1003], E0[:1003]) and torch.equal(head[:1003], H0[:1003])
    assert torch.equal(emb[1006:], E0[1006:]) and torch.equal(head[1006:], H0[1006:])
    with torch.no_grad():
        merged = model(probe)
    torch.testing.assert_close(merged, trained, rtol=1e-5, atol=1e-5)

    out = save(model, tmp_path / "merged", tokenizer=tok)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] == tied
    ours = load(out, dtype=torch.float32)
    theirs = hf_model(out)
    with torch.no_grad():
        assert torch.equal(ours(probe), merged)
        torch.testing.assert_close(theirs(probe).logits, merged, rtol=1e-5, atol=1e-5)
        assert theirs.generate(prompt, max_new_tokens=1, do_sample=False)[0, -1].item() == 1003
    assert ours.is_tied == tied and theirs.config.tie_word_embeddings == tied
    text = "import asyncio; call getaddrinfo(数据库系统)"
    assert Tokenizer.from_pretrained(out).encode(text) == probe[0].tolist()
    assert hf_tokenizer(out).encode(text, add_special_tokens=False) == probe[0].tolist()


def test_modules_to_save_trains_every_row_and_stays_tied(small_tok, tiny_dirs, tmp_path):
    path, _ = tiny_dirs[True]
    model = load(path, dtype=torch.float32)
    ext = vocab.add_tokens(model, small_tok, NEW)
    before = model.model.embed_tokens.weight.detach().clone()
    lora.inject(model, r=4, alpha=8, modules_to_save=["embed_tokens", "lm_head"])
    batch = torch.tensor([ext.tokenizer.encode("import asyncio")] * 2)
    torch.manual_seed(0)
    train_steps(model, batch, steps=3, weight_decay=0.0)
    lora.merge(model)
    assert model.is_tied
    after = model.model.embed_tokens.weight
    assert not torch.equal(after[ext.ids], before[ext.ids])
    assert not torch.equal(after[:1003], before[:1003])  # the full copy trained the old rows too
    out = save(model, tmp_path / "merged", tokenizer=ext.tokenizer)
    with torch.no_grad():
        logits = model(batch)
        assert torch.equal(load(out, dtype=torch.float32)(batch), logits)
        torch.testing.assert_close(hf_model(out)(batch).logits, logits, rtol=1e-5, atol=1e-5)


def test_new_rows_travel_with_the_adapter_and_in_unmerged_saves(small_tok, tiny_dirs, tmp_path):
    path, _ = tiny_dirs[False]
    model = load(path, dtype=torch.float32)
    ext = vocab.add_tokens(model, small_tok, NEW)
    base = save(model, tmp_path / "extended-base", tokenizer=ext.tokenizer)  # the 16-bit base to merge into
    lora.inject(model, r=4, alpha=8)
    vocab.train_new_rows(model, ext.ids)
    batch = torch.tensor([ext.tokenizer.encode("import asyncio 数据库系统")] * 2)
    torch.manual_seed(0)
    train_steps(model, batch, steps=3)
    adapter = lora.save(model, tmp_path / "adapter")
    vocab.save_new_rows(model, adapter)
    assert (adapter / vocab.NEW_ROWS_FILE).is_file()
    with torch.no_grad():
        trained = model(batch)

    fresh = load(base, dtype=torch.float32)
    lora.load(fresh, adapter)
    vocab.load_new_rows(fresh, adapter)  # plain model: straight into the weights
    lora.merge(fresh)
    with torch.no_grad():
        torch.testing.assert_close(fresh(batch), trained, rtol=1e-5, atol=1e-5)

    # Rows alone (no LoRA): state_dict() writes the trained rows under the original keys, so
    # saving without merging keeps them; loading a state dict back fills the rows.
    rows_only = load(base, dtype=torch.float32)
    for p in rows_only.parameters():
        p.requires_grad_(False)
    vocab.train_new_rows(rows_only, ext.ids)
    vocab.load_new_rows(rows_only, adapter)  # into the training wrappers
    state = rows_only.state_dict()
    assert not any("rows" in k for k in state) and set(state) == set(load(base).state_dict())
    with torch.no_grad():
        expected = rows_only(batch)
        out = save(rows_only, tmp_path / "unmerged")  # one matmul instead of two: rounding differs
        torch.testing.assert_close(load(out, dtype=torch.float32)(batch), expected, rtol=1e-5, atol=1e-5)
        again = load(base, dtype=torch.float32)
        vocab.train_new_rows(again, ext.ids)
        again.load_state_dict(state)
        assert torch.equal(again(batch), expected)


def test_training_errors(small_tok, tiny_dirs):
    path, _ = tiny_dirs[False]
    model = load(path, dtype=torch.float32)
    with pytest.raises(ValueError, match="1024 embedding rows but the tokenizer has 151665 tokens"):
        vocab.add_tokens(load(path), Tokenizer.default(), ["wsgiref"])
    ext = vocab.add_tokens(model, small_tok, NEW)
    with pytest.raises(ValueError, match="neither new-token rows nor LoRA"):
        vocab.merge(model)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 1024\)"):
        vocab.train_new_rows(model, [5000])
    vocab.train_new_rows(model, ext.ids)
    with pytest.raises(ValueError, match="already trains new-token rows"):
        vocab.train_new_rows(model, ext.ids)
    with pytest.raises(ValueError, match="before lora.inject"):
        vocab.add_tokens(model, ext.tokenizer, [" wsgiref"])
    # lora.inject after train_new_rows freezes the rows: the forward pass says so
    lora.inject(model, r=4, alpha=8)
    model.train()
    with pytest.warns(UserWarning, match="call vocab.train_new_rows after lora.inject"):
        model(torch.tensor([[1, 1003]]), labels=torch.tensor([[1, 1003]]))

    other = load(path, dtype=torch.float32)
    lora.inject(other, r=4, alpha=8, modules_to_save=["embed_tokens"])
    with pytest.raises(ValueError, match="modules_to_save"):
        vocab.train_new_rows(other, [1003])



# ---------------------------------------------------------------------- mining
def test_mining_report_on_the_embedded_corpus(tok, hf_tok, tmp_path):
    from demo.corpus import domain_documents

    docs = domain_documents(max_chars=100_000)  # a bounded slice of the embedded default
    assert 10 <= len(docs) and sum(map(len, docs)) >= 100_000
    report = vocab.mine_tokens(docs, tok, max_tokens=12, min_frequency=5, sp_vocab_size=1500)
    assert 5 <= len(report.rows) <= 12
    assert report.saving == report.tokens_before - report.tokens_after == sum(r.saving for r in report.rows) > 0
    text = report.table()
    assert "Qwen pieces before" in text and f"-{report.saving:,}" in text

    # The reference: transformers' tokenizer, before and after, on the same documents.
    docs_nfc = [unicodedata.normalize("NFC", d) for d in docs]
    before = hf_tok(docs_nfc, add_special_tokens=False)["input_ids"]
    assert sum(map(len, before)) == report.tokens_before
    after = hf_tokenizer(report.tokenizer.save_pretrained(tmp_path / "ext"))(docs_nfc, add_special_tokens=False)["input_ids"]
    assert sum(map(len, after)) == report.tokens_after
    counts = {}
    for ids in after:
        for i in ids:
            counts[i] = counts.get(i, 0) + 1
    for row in report.rows:
        assert row.id >= len(tok) and row.frequency == counts[row.id] > 0
        pieces = hf_tok.encode(row.token, add_special_tokens=False)
        assert len(pieces) == len(row.pieces) >= 2
        assert "".join(row.pieces) == row.token
        assert row.saving >= 5  # min_saving defaults to min_frequency

    # The CPT pipeline's own tokenisation gets shorter by the reported amount (+1 eos per document).
    from data import load_corpus

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    n_before = load_corpus([corpus], tok, progress=False).n_tokens
    n_after = load_corpus([corpus], report.tokenizer, progress=False).n_tokens
    assert n_before - n_after == report.saving and n_before == report.tokens_before + len(docs)


def test_measure_tokens_reports_a_given_list_in_order(tok):
    # Each term alone on its line: every occurrence saves exactly (its Qwen pieces - 1).
    docs = ["数据库系统\n数据库系统\n", "getaddrinfo\ngetaddrinfo\n", "nothing to see"]
    report = vocab.measure_tokens(docs, tok, ["数据库系统", "getaddrinfo"])
    assert report.tokens == ["数据库系统", "getaddrinfo"] and report.source.startswith("given list")
    assert [r.id for r in report.rows] == [151665, 151666]
    for row in report.rows:
        n_pieces = len(tok.encode(row.token))
        assert row.frequency == 2 and row.saving == 2 * (n_pieces - 1) and len(row.pieces) == n_pieces
    assert report.saving == sum(r.saving for r in report.rows)
    assert vocab.count_tokens(docs, report.tokenizer) == report.tokens_after


# ---------------------------------------------------------------------- the CLI
def test_cli_adds_given_tokens_to_a_checkpoint(small_tok, tiny_dirs, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_dirs[True][0], model_dir)
    small_tok.save_pretrained(model_dir)
    (tmp_path / "terms.txt").write_text(" asyncio\n数据库系统\n\n", encoding="utf-8")
    (tmp_path / "docs.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in ["import asyncio\n" * 3, "数据库系统 " * 4]), encoding="utf-8")
    out = tmp_path / "out"
    proc = run_script("extend_vocab.py", "--model", model_dir, "--data", tmp_path / "docs.jsonl",
                      "--tokens", tmp_path / "terms.txt", "--out", out, cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "' asyncio'" in proc.stdout and "padding rows" in proc.stdout
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert [t["token"] for t in report["tokens"]] == [" asyncio", "数据库系统"]
    assert report["tokens_before"] - report["tokens_after"] == report["saving"] > 0
    ext = Tokenizer.from_pretrained(out)
    assert ext.text_tokens == {" asyncio": 1003, "数据库系统": 1004}
    model = load(out, dtype=torch.float32)
    assert model.config.vocab_size == ROWS and model.is_tied
    assert hf_tokenizer(out).encode("import asyncio", add_special_tokens=False) == ext.encode("import asyncio")

    # bad input: one line naming the file and line, exit 2, nothing written
    (tmp_path / "bad.txt").write_text(" asyncio\n<|im_end|>\n", encoding="utf-8")
    proc = run_script("extend_vocab.py", "--model", model_dir, "--tokens", tmp_path / "bad.txt",
                      "--out", tmp_path / "out2", cache=tmp_path / "cache")
    assert_usage_error(proc, "bad.txt:2", "collides with the special token")
    assert not (tmp_path / "out2").exists()
