"""examples/evaluate.py end to end (subprocesses): explicit rows, the embedded-default layout,
and bad input (one line on stderr, exit 2)."""

import json
import math
from pathlib import Path

import pytest
import torch

from tests.examples.conftest import assert_usage_error, run_script
from tests.helpers import hf_model, save_hf_model

QWEN_VOCAB = dict(vocab_size=151936, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512)
EOT = 151643


def _peft_adapter(base_seed, out, base_dir):
    import peft

    torch.manual_seed(5)
    model = peft.get_peft_model(hf_model("qwen2", seed=base_seed, **QWEN_VOCAB),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    model.save_pretrained(out)
    return model.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("eval-models")
    base = hf_model("qwen2", seed=1, **QWEN_VOCAB)
    save_hf_model(base, root / "base")
    tuned = _peft_adapter(1, root / "adapter", root / "base")
    other = hf_model("qwen2", seed=2, **QWEN_VOCAB)
    save_hf_model(other, root / "other")
    return root, base, tuned, other


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval-data")
    _jsonl(d / "domain.jsonl", [{"text": "The socket module provides access to the BSD socket interface."},
                                {"text": "An event loop runs asynchronous tasks and callbacks. " * 4}])
    (d / "general.txt").write_text("Python is a programming language. 它很流行。", encoding="utf-8")
    _jsonl(d / "q.jsonl", [{"instruction": "What does json.dumps do?", "output": "Serialize obj to JSON."},
                           {"messages": [{"role": "user", "content": "什么是列表？"},
                                         {"role": "assistant", "content": "可变序列。"}]}])
    return d


def test_explicit_rows_write_the_report(models, data, tmp_path):
    root, base, tuned, other = models
    out = tmp_path / "eval"
    proc = run_script("evaluate.py", "--model", f"base={root / 'base'}", "--adapter", f"cpt={root / 'adapter'}",
                      "--model", str(root / "other"), "--domain-data", data / "domain.jsonl",
                      "--general-data", data / "general.txt", "--instructions", data / "q.jsonl",
                      "--max-length", "128", "--max-new-tokens", "5", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    rows = report["models"]
    assert [r["name"] for r in rows] == ["base", "cpt", "other"]
    assert rows[1]["adapter_dir"] == str(root / "adapter") and rows[1]["model_dir"] == str(root / "base")
    # The perplexities are those of the transformers / PEFT models (documents fit one window).
    from models.qwen import Tokenizer

    tok = Tokenizer.default()
    texts = [json.loads(l)["text"] for l in (data / "domain.jsonl").read_text(encoding="utf-8").splitlines()]
    for row, ref in zip(rows, (base, tuned, other)):
        nll = n = 0
        for t in texts:
            ids = torch.tensor([tok.encode(t) + [EOT]])
            with torch.no_grad():
                logits = ref(ids).logits[0, :-1].double()
            nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            n += ids.shape[1] - 1
        assert row["domain"]["tokens"] == n
        # train.perplexity's sum, whose error test_perplexity measured at most 2.3e-7 (430x margin)
        assert abs(row["domain"]["ppl"] - math.exp(nll / n)) / math.exp(nll / n) < 1e-4
        assert row["generation"]["n"] == 2 and 0 <= row["generation"]["stop_rate"] <= 1
        assert row["forgetting"] in (True, False)
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "| base |" in md and "| cpt |" in md and "| other |" in md
    assert "| base |" in proc.stdout and "report.md" in proc.stdout


def test_embedded_default_evaluates_the_stages_that_exist(tmp_path, monkeypatch):
    """The default run's layout: cached demo base, runs/cpt/adapter, runs/cpt-merged and DPO's
    runs/dpo/adapter on runs/sft/merged (dpo.py --no-merge); residual not run yet -> evaluated
    rows (a dpo row included: issue 30, item 6) + residual listed as missing."""
    pytest.importorskip("peft")
    from demo.base_model import base_dir as demo_base_dir

    cache = tmp_path / "cache"
    monkeypatch.setenv("QWEN_TUNE_CACHE", str(cache))
    base_dir = demo_base_dir()
    assert base_dir.is_relative_to(cache)
    save_hf_model(hf_model("qwen2", seed=1, **QWEN_VOCAB), base_dir)
    work = tmp_path / "work"
    _peft_adapter(1, work / "runs" / "cpt" / "adapter", base_dir)
    _jsonl(work / "runs" / "cpt" / "metrics.jsonl", [{"step": s, "loss": 4.0 / s, "lr": 1e-4} for s in (1, 2, 3)])
    save_hf_model(hf_model("qwen2", seed=3, **QWEN_VOCAB), work / "runs" / "cpt-merged")
    save_hf_model(hf_model("qwen2", seed=1, **QWEN_VOCAB), work / "runs" / "sft" / "merged")
    _peft_adapter(1, work / "runs" / "dpo" / "adapter", work / "runs" / "sft" / "merged")

    proc = run_script("evaluate.py", "--max-tokens", "300", "--max-instructions", "3", "--max-new-tokens", "4",
                      cwd=work, cache=cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((work / "runs" / "eval" / "report.json").read_text(encoding="utf-8"))
    assert [r["name"] for r in report["models"]] == ["base", "cpt", "cpt-merged", "sft", "dpo"]
    assert report["models"][1]["adapter_dir"].endswith("runs/cpt/adapter")
    assert report["models"][4]["adapter_dir"].endswith("runs/dpo/adapter")
    assert report["models"][4]["model_dir"].endswith("runs/sft/merged")
    assert [m["name"] for m in report["missing"]] == ["residual"]
    assert "examples/residual.py" in report["missing"][0]["reason"]
    for r in report["models"]:
        assert r["domain"]["tokens"] > 0 and r["general"]["tokens"] > 0 and r["generation"]["n"] == 3
    assert report["loss_curves"] == {"cpt": [str(Path("runs/cpt/metrics.jsonl"))]}
    assert "missing stage residual" in proc.stdout


def test_embedded_default_with_nothing_run_yet(tmp_path):
    proc = run_script("evaluate.py", cwd=tmp_path, cache=tmp_path / "cache")
    assert_usage_error(proc, "no stage of the embedded-default run found", "examples/cpt.py")


def test_bad_input_exits_2_with_one_line(models, data, tmp_path):
    root = models[0]
    ok = ["--domain-data", str(data / "domain.jsonl")]
    assert_usage_error(run_script("evaluate.py", "--model", str(tmp_path / "nope"), *ok), "--model", "not found")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "q", "output": "a"}\n{"instruction": \n', encoding="utf-8")
    assert_usage_error(run_script("evaluate.py", "--model", str(root / "base"), "--instructions", str(bad)),
                       "bad.jsonl:2", "malformed JSON")


def test_bad_input_messages(models, data, tmp_path):
    """The same checks in-process (the exit-2 wrapper is shared with the other scripts)."""
    from cli.errors import UsageError
    from examples import evaluate as cli

    root = models[0]
    ok = ["--domain-data", str(data / "domain.jsonl")]

    def fails(*argv, match):
        with pytest.raises(UsageError, match=match):
            cli.main(list(map(str, argv)))

    fails("--model", data, *ok, match="--model .*not a Qwen checkpoint")
    fails("--adapter", root / "base", *ok, match="--adapter .*adapter_config.json")
    fails("--model", root / "base", match="nothing to evaluate")
    fails("--model", root / "base", "--domain-data", tmp_path / "missing.jsonl", match="--domain-data .*missing.jsonl")
    fails("--model", root / "base", *ok, "--max-length", "8", "--stride", "8", match="--stride 8 must be smaller")
    fails("--model", root / "base", "--metrics", "nobody=x.jsonl", *ok, match="--metrics nobody=x.jsonl")
    # An adapter whose recorded base is not a local directory needs @BASE.
    adapter = tmp_path / "mycpt" / "adapter"
    adapter.mkdir(parents=True)
    cfg = json.loads((root / "adapter" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "Qwen/Qwen2.5-7B"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    (adapter / "adapter_model.safetensors").write_bytes((root / "adapter" / "adapter_model.safetensors").read_bytes())
    fails("--adapter", adapter, *ok, match="--adapter .*@BASE_DIR")
    # ... and with @BASE it is accepted (rows named after the flags, duplicates made unique).
    rows = cli.candidates_from_flags([("adapter", f"{adapter}@{root / 'base'}"), ("model", str(root / "base")),
                                      ("model", f"b={root / 'base'}"), ("model", f"b={root / 'other'}")], [])
    assert [r.name for r in rows] == ["mycpt", "base", "b", "b-2"]
    assert rows[0].model_dir == root / "base" and rows[0].adapter_dir == adapter
