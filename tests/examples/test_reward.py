"""examples/reward.py as a user runs it (one subprocess): held-out accuracy before and after, TRL's
metric names, an adapter/ that PEFT loads over AutoModelForSequenceClassification and a merged/
that transformers loads, both with our scores; bad input is exit 2 naming the file and line."""

from __future__ import annotations

import json

import pytest
import torch

from tests.examples.conftest import run_script
from tests.helpers import assert_close_to_reference, float64_twin, tiny_checkpoint

QA = [("What is a socket?", "An endpoint for data.", "A kind of fruit."),
      ("What does json do?", "It encodes objects as text.", "It bakes bread."),
      ("What is TLS?", "Encryption for sockets.", "A shade of blue."),
      ("What is a queue?", "A first-in first-out list.", "A type of hat.")] * 2
SMALL = dict(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=1, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory):
    from models.qwen import Tokenizer

    tmp = tmp_path_factory.mktemp("rm")
    model, _ = tiny_checkpoint(tmp / "sft-merged", **SMALL)
    Tokenizer.default().save_pretrained(model)
    pairs = tmp / "pairs.jsonl"
    with open(pairs, "w", encoding="utf-8") as f:
        for i, (q, good, bad) in enumerate(QA):
            if i % 2:   # TRL's string form (with a margin) and its message-list form
                f.write(json.dumps({"prompt": q, "chosen": good, "rejected": bad, "margin": 0.5}) + "\n")
            else:
                f.write(json.dumps({"prompt": [{"role": "user", "content": q}],
                                    "chosen": [{"role": "assistant", "content": good}],
                                    "rejected": [{"role": "assistant", "content": bad}]}) + "\n")
    return model, pairs, tmp


def scored_batch():
    from models.qwen import Tokenizer
    from models.qwen.special_tokens import ENDOFTEXT_ID

    tok = Tokenizer.default()
    rows = [tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
            for q, a, _ in QA[:3]]
    ids = torch.full((len(rows), max(map(len, rows))), ENDOFTEXT_ID)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
    return ids, (ids != ENDOFTEXT_ID).long()


def test_reward_run_reports_accuracy_and_writes_folders_transformers_and_peft_load(sft_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    import lora
    from models.qwen import load
    from models.qwen.score import to_sequence_classifier
    from models.qwen.special_tokens import ENDOFTEXT_ID

    model, pairs, tmp = sft_model
    out = tmp_path / "rm"
    proc = run_script("reward.py", "--model", model, "--data", pairs, "--out", out, "--batch-size", "2",
                      "--grad-accum", "1", "--max-steps", "3", "--lr", "1e-2", "--lora-r", "4", "--lora-dropout", "0",
                      "--dtype", "fp32", "--eval-fraction", "0.25", "--max-len", "64",
                      "--center-rewards-coefficient", "0.01", cache=tmp / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert "held-out before: " in text and "held-out after: " in text and "accuracy" in text
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert train and all({"accuracy", "margin", "mean_reward", "pairs"} <= set(r) for r in train)
    before = [r for r in rows if r.get("when") == "before training"]
    assert len(before) == 1 and 0 <= before[0]["val_accuracy"] <= 1
    assert any("val_accuracy" in r and r.get("when") is None for r in rows)   # the final evaluation

    config = json.loads((out / "merged" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForSequenceClassification"] and config["pad_token_id"] == ENDOFTEXT_ID
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    ids, mask = scored_batch()
    ours = load(out / "merged")
    hf = AutoModelForSequenceClassification.from_pretrained(out / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        assert_close_to_reference(ours(ids, attention_mask=mask), hf(ids, attention_mask=mask).logits,
                                  float64_twin(hf)(ids, attention_mask=mask).logits, what="merged/")

    base = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1, pad_token_id=ENDOFTEXT_ID,
                                                              dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, out / "adapter").eval()
    mine = to_sequence_classifier(load(model))
    mine.config.pad_token_id = ENDOFTEXT_ID
    lora.load(mine, out / "adapter")
    mine.eval()
    with torch.no_grad():
        assert_close_to_reference(mine(ids, attention_mask=mask), peft(ids, attention_mask=mask).logits,
                                  float64_twin(peft)(ids, attention_mask=mask).logits, what="adapter/ in PEFT")


@pytest.mark.parametrize("record,needle", [
    ({"prompt": "q", "chosen": "a"}, "missing field 'rejected'"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}, "field 'margin' must be a finite number"),
])
def test_bad_pairs_exit_2_naming_file_and_line(sft_model, tmp_path, capsys, monkeypatch, record, needle):
    from cli.errors import run_main
    from examples import reward

    model, _, tmp = sft_model
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps(record) + "\n")
    monkeypatch.setenv("QWEN_TUNE_CACHE", str(tmp / "cache"))
    with pytest.raises(SystemExit) as stop:
        run_main(lambda: reward.main(["--model", str(model), "--data", str(bad), "--out", str(tmp_path / "out")]))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and needle in err, err
