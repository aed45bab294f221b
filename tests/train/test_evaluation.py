"""The comparison report: batched greedy answers vs transformers, perplexity rows vs
transformers/PEFT, the forgetting flag, input parsing and the loss-curve plot."""

import builtins
import json
import math

import pytest
import torch

from tests.helpers import hf_model, random_ids, save_hf_model
from train.evaluation import (
    Candidate,
    EvalSettings,
    cap_tokens,
    compare_models,
    forgetting_check,
    generate_answers,
    read_instructions,
)
from train.report import ReportError, plot_loss_curves, read_loss_curves, render_markdown

IM_END, EOT = 151645, 151643


# ---------------------------------------------------------------------- batched greedy answers
@pytest.fixture(scope="module")
def small_pair(tmp_path_factory):
    from models.qwen import load

    ref = hf_model("qwen2", tie_word_embeddings=True)
    return ref, load(save_hf_model(ref, tmp_path_factory.mktemp("small")), dtype=torch.float32)


def _hf_answer(ref, prompt, max_new, stops):
    out = ref.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False,
                       eos_token_id=list(stops), pad_token_id=0)[0, len(prompt):].tolist()
    cut = next((k for k, t in enumerate(out) if t in stops), None)
    return (out, None) if cut is None else (out[:cut], out[cut])


def test_batched_left_padded_answers_equal_transformers_one_by_one(small_pair):
    ref, ours = small_pair
    prompts = [random_ids(1, n, seed=n)[0].tolist() for n in (3, 9, 6, 12, 5, 9)]
    # Stop ids that some greedy continuations reach: the 3rd new token of two prompts.
    free = [_hf_answer(ref, p, 6, [])[0] for p in prompts]
    stops = (free[0][2], free[3][1])
    want = [_hf_answer(ref, p, 10, stops) for p in prompts]
    assert any(s is not None for _, s in want) and any(s is None for _, s in want)
    for batch_size in (1, 4, 6):
        answers, seconds = generate_answers(ours, prompts, max_new_tokens=10, batch_size=batch_size,
                                            stop_ids=stops, pad_id=0)
        assert [(a.ids, a.stop_id) for a in answers] == want
        assert seconds > 0


# ---------------------------------------------------------------------- forgetting
def test_forgetting_flag_against_the_first_row():
    rows = [{"general": {"ppl": 100.0}, "domain": {"ppl": 50.0}},
            {"general": {"ppl": 109.9}, "domain": {"ppl": 40.0}},
            {"general": {"ppl": 110.1}},
            {"general": {"ppl": 90.0}},
            {"domain": {"ppl": 45.0}}]
    forgetting_check(rows, threshold=0.10)
    assert [r["forgetting"] for r in rows] == [False, False, True, False, None]
    assert rows[1]["general_ppl_change"] == pytest.approx(0.099)
    assert rows[1]["domain_ppl_change"] == pytest.approx(-0.2)
    assert rows[2]["domain_ppl_change"] is None
    forgetting_check(rows, threshold=0.05)
    assert rows[1]["forgetting"] is True
    with pytest.raises(ValueError, match="threshold"):
        forgetting_check(rows, threshold=-1)


def test_cap_tokens_shares_the_budget():
    docs = [list(range(10)), list(range(100, 103)), list(range(200, 220))]
    assert cap_tokens(docs, None) == docs
    assert cap_tokens(docs, 33) == docs  # everything fits
    # 21 tokens over 3 documents: the short one keeps its 3, the others split 18 -> 9 + 9.
    assert cap_tokens(docs, 21, min_doc_tokens=1) == [list(range(9)), list(range(100, 103)), list(range(200, 209))]
    # 12 tokens, at least 6 per document: only the first 2 documents, 3 + 9.
    assert cap_tokens(docs, 12, min_doc_tokens=6) == [list(range(9)), list(range(100, 103))]
    assert cap_tokens(docs, 2, min_doc_tokens=6) == [[0, 1]]
    assert sum(map(len, cap_tokens(docs, 20, min_doc_tokens=1))) == 20


# ---------------------------------------------------------------------- inputs
def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_read_instructions_all_formats(tmp_path):
    f = _write(tmp_path / "eval.jsonl", [
        json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "What does json.dumps do?"},
                                 {"role": "assistant", "content": "Serialize obj to a JSON str."}]}),
        "",
        json.dumps({"instruction": "翻译成英文", "input": "北京", "output": "Beijing"}, ensure_ascii=False),
        json.dumps({"instruction": "Say hi", "output": "hi", "system": "S"}),
        json.dumps({"conversations": [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
                                      {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]}),
    ])
    xs = read_instructions(f)
    assert [x.reference for x in xs] == ["Serialize obj to a JSON str.", "Beijing", "hi", "a2"]
    assert xs[0].messages[-1] == {"role": "user", "content": "What does json.dumps do?"}
    assert xs[0].source == f"{f}:1" and xs[1].source == f"{f}:3"
    assert xs[1].messages == [{"role": "user", "content": "翻译成英文\n\n北京"}]
    assert xs[2].messages[0] == {"role": "system", "content": "S"}
    assert [m["content"] for m in xs[3].messages] == ["q1", "a1", "q2"]
    assert len(read_instructions(f, limit=2)) == 2


@pytest.mark.parametrize("line, message", [
    ('{"messages": [', "eval.jsonl:2: malformed JSON"),
    ('{"instruction": "x"}', "eval.jsonl:2: missing field 'output'"),
    ('{"messages": [{"role": "user", "content": "q"}]}', "eval.jsonl:2: .*must end with an assistant turn"),
    ('{"messages": [{"role": "bot", "content": "q"}]}', "eval.jsonl:2: message 0 has role 'bot'"),
    ('{"prompt": "q"}', "eval.jsonl:2: cannot tell the format"),
    ('[1, 2]', "eval.jsonl:2: expected a JSON object"),
])
def test_read_instructions_errors_name_file_and_line(tmp_path, line, message):
    # data.DataError, a ValueError, names the file and line.
    good = json.dumps({"instruction": "a", "output": "b"})
    f = _write(tmp_path / "eval.jsonl", [good, line])
    with pytest.raises(ValueError, match=message):
        read_instructions(f)
    (tmp_path / "latin.jsonl").write_bytes(good.encode() + b"\ncaf\xe9")
    with pytest.raises(ValueError, match="latin.jsonl:2: not UTF-8"):
        read_instructions(tmp_path / "latin.jsonl")


def test_documents_text_or_token_ids():
    from train.evaluation import tokenized

    class Tok:
        def encode(self, text):
            return [ord(c) for c in text]

    assert tokenized(Tok(), ["ab", [5, 6, 7]]) == [[97, 98, EOT], [5, 6, 7]]
    # A budget under 2 x 256 tokens goes to the first document only.
    assert tokenized(Tok(), ["ab", [5, 6, 7], "cd"], max_tokens=4) == [[97, 98, EOT]]
    assert tokenized(Tok(), ["abcdef", [5, 6, 7]], max_tokens=4) == [[97, 98, 99, 100]]


# ---------------------------------------------------------------------- loss curves
def test_read_loss_curves(tmp_path):
    f = _write(tmp_path / "metrics.jsonl", [
        json.dumps({"step": 1, "loss": 3.0, "lr": 1e-4}),
        json.dumps({"step": 2, "loss": 2.5}),
        json.dumps({"step": 2, "eval_loss": 2.7}),
        json.dumps({"step": 3, "loss": 2.0, "val_loss": 2.4}),
        json.dumps({"step": 4, "split": "eval", "loss": 2.2}),
        json.dumps({"step": 5, "loss": float("nan")}).replace("NaN", "NaN"),
        '{"step": 6, "loss": 1.',  # killed mid-write
    ])
    c = read_loss_curves(f)
    assert c == {"train": [(1, 3.0), (2, 2.5), (3, 2.0)], "eval": [(2, 2.7), (3, 2.4), (4, 2.2)]}
    assert read_loss_curves(tmp_path / "missing.jsonl") == {"train": [], "eval": []}


def test_plot_without_matplotlib_returns_none(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert plot_loss_curves({"cpt": {"train": [(1, 2.0)], "eval": []}}, tmp_path / "x.png") is None
    assert not (tmp_path / "x.png").exists()


def test_plot_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    out = plot_loss_curves({"cpt": {"train": [(1, 2.0), (2, 1.5)], "eval": [(2, 1.7)]}}, tmp_path / "c.png")
    assert out == tmp_path / "c.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------- the whole report
QWEN_VOCAB = dict(vocab_size=151936, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                  num_key_value_heads=2)
DOMAIN = ["The json module encodes Python objects as JSON text and decodes them back.",
          "asyncio runs coroutines on an event loop; await suspends until a future is done. " * 3]
GENERAL = ["A list is a mutable sequence. Tuples are immutable sequences of objects.",
           "列表是可变序列，元组是不可变序列。"]


def _hf_ppl(hf, tok, texts):
    """exp(token-weighted mean NLL) through the transformers model: document + <|endoftext|>."""
    nll, n = 0.0, 0
    for t in texts:
        ids = torch.tensor([tok.encode(t) + [EOT]])
        with torch.no_grad():
            logits = hf(ids).logits[0, :-1].double()
        nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        n += ids.shape[1] - 1
    return math.exp(nll / n)


QUESTIONS = [
    {"instruction": "What does json.dumps do?", "output": "Serialize obj to a JSON formatted str."},
    {"messages": [{"role": "user", "content": "列表是什么？"}, {"role": "assistant", "content": "列表是可变序列。"}]},
    {"instruction": "Name a mutable sequence.", "output": "list"},
]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A base, a PEFT adapter on it, and a damaged copy (head scaled: general ppl rises)."""
    pytest.importorskip("peft")
    from models.qwen import Tokenizer

    if Tokenizer is None:
        pytest.fail("models.qwen.Tokenizer is not available yet")
    import peft

    tok = Tokenizer.default()
    root = tmp_path_factory.mktemp("report")
    base = hf_model("qwen2", seed=1, tie_word_embeddings=False, **QWEN_VOCAB)
    save_hf_model(base, root / "base")
    torch.manual_seed(2)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    tuned = peft.get_peft_model(hf_model("qwen2", seed=1, tie_word_embeddings=False, **QWEN_VOCAB), cfg)
    with torch.no_grad():
        for n, p in tuned.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    tuned.save_pretrained(root / "adapter")
    damaged = hf_model("qwen2", seed=1, tie_word_embeddings=False, **QWEN_VOCAB)
    with torch.no_grad():
        damaged.lm_head.weight.mul_(8.0)
        # Give <|im_end|> 1.5x the head row of the 2nd token the model would answer to the
        # first question: that answer now ends with <|im_end|> (a stop to count).
        x = read_instructions_from_rows(QUESTIONS)[0]
        prompt = list(tok.apply_chat_template(x.messages, add_generation_prompt=True, tokenize=True))
        second = _hf_answer(damaged, prompt, 2, ())[0][1]
        damaged.lm_head.weight[IM_END] = damaged.lm_head.weight[second] * 1.5
    save_hf_model(damaged, root / "damaged")
    return root, base, tuned.eval(), damaged, tok


def read_instructions_from_rows(rows):
    from train.evaluation import instruction_from_example

    return [instruction_from_example(r, f"row {i}") for i, r in enumerate(rows)]


def test_report_rows_match_transformers_and_peft(pipeline, tmp_path):
    root, base, tuned, damaged, tok = pipeline
    _write(tmp_path / "metrics.jsonl", [json.dumps({"step": s, "loss": 5.0 / s}) for s in (1, 2, 3)])
    questions = _write(tmp_path / "q.jsonl", [json.dumps(q, ensure_ascii=False) for q in QUESTIONS])
    candidates = [
        Candidate("base", root / "base"),
        Candidate("cpt", root / "base", adapter_dir=root / "adapter", metrics=[tmp_path / "metrics.jsonl"]),
        Candidate("damaged", root / "damaged"),
    ]
    # Windows long enough for every document: each row's perplexity is then exp of the mean
    # token loss of the transformers / PEFT model (the windowing is tested in test_perplexity).
    settings = EvalSettings(max_length=256, stride=128, batch_size=3, max_new_tokens=6, gen_batch_size=2)
    report = compare_models(candidates, domain=DOMAIN, general=GENERAL, instructions=read_instructions(questions),
                            settings=settings, out_dir=tmp_path / "eval",
                            missing=[{"name": "sft", "reason": "runs/sft/merged not found"}])
    rows = {r["name"]: r for r in report["models"]}
    assert list(rows) == ["base", "cpt", "damaged"]
    for r, ref in zip(report["models"], (base, tuned, damaged)):
        for part, texts in (("domain", DOMAIN), ("general", GENERAL)):
            want = _hf_ppl(ref, tok, texts)
            # train.perplexity's sum, whose error test_perplexity measured at most 2.3e-7 (430x margin)
            assert abs(r[part]["ppl"] - want) / want < 1e-4, (r["name"], part)
    assert rows["cpt"]["domain"]["ppl"] != pytest.approx(rows["base"]["domain"]["ppl"], rel=1e-3)

    # Forgetting: the damaged head raises general perplexity far beyond 10%.
    assert rows["base"]["forgetting"] is False and rows["damaged"]["forgetting"] is True
    assert rows["damaged"]["general_ppl_change"] > 0.10

    # Generation: the answers are the transformers model's greedy answers to the ChatML prompts.
    instructions = read_instructions(questions)
    for name, ref in (("base", base), ("damaged", damaged)):
        g = rows[name]["generation"]
        lengths, stopped = [], []
        for x, sample in zip(instructions, g["samples"]):
            prompt = tok.apply_chat_template(x.messages, add_generation_prompt=True, tokenize=True)
            ids, stop = _hf_answer(ref, list(prompt), 6, (IM_END, EOT))
            assert sample["answer"] == tok.decode(ids)
            lengths.append(len(ids))
            stopped.append(stop == IM_END)
        assert g["n"] == 3 and g["avg_length"] == pytest.approx(sum(lengths) / 3)
        assert g["stop_rate"] == pytest.approx(sum(stopped) / 3)
    assert rows["damaged"]["generation"]["stop_rate"] > 0

    # Files: JSON with every row, Markdown with one table line per model and the missing stage.
    data = json.loads((tmp_path / "eval" / "report.json").read_text(encoding="utf-8"))
    assert [r["name"] for r in data["models"]] == ["base", "cpt", "damaged"]
    md = (tmp_path / "eval" / "report.md").read_text(encoding="utf-8")
    table = [line for line in md.splitlines() if line.startswith("| ") and "ppl" not in line]
    assert [line.split("|")[1].strip() for line in table] == ["base", "cpt", "damaged"]
    assert "**yes**" in table[2] and "sft" in md and "runs/sft/merged not found" in md
    assert "Forgetting" in md and "damaged" in md.split("**Forgetting:**")[1]


def test_report_errors(tmp_path):
    with pytest.raises(ReportError, match="no model"):
        compare_models([], domain=["x"])
    with pytest.raises(ReportError, match="nothing to evaluate"):
        compare_models([Candidate("a", tmp_path)])


def test_markdown_renders_missing_values():
    report = {"created": "now", "reference": "base", "forgetting_threshold": 0.1,
              "settings": {"max_length": 8, "stride": 4, "max_new_tokens": 4},
              "models": [{"name": "base", "general": {"ppl": 10.0, "tokens_per_s": 5.0},
                          "general_ppl_change": 0.0, "domain_ppl_change": None, "forgetting": False}],
              "missing": [], "data": {}, "loss_curves": {}}
    md = render_markdown(report)
    assert "| base | – | – | 10.000 | +0.0% | no | – | – | – | – | – | 5 |" in md
