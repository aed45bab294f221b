"""Hostile input files met the way a user meets them, through the scripts in subprocesses: one
line naming the file (exit 2), never a traceback or a hang.

* every JSON and YAML reader a stage goes through, fed a value nested thousands of levels deep;
* a config.json whose numbers are not numbers a model can have;
* a run.json that is not an object; a --config file whose keys are not names.
"""

from __future__ import annotations

import json
import shutil
import struct

import pytest

from tests.examples.conftest import assert_usage_error, run_script
from tests.helpers import tiny_checkpoint

DEEP = 5000   # far past Python's recursion limit (1000)
DEEP_JSON = "[" * DEEP + "]" * DEEP
SFT_LINE = json.dumps({"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]})
DPO_LINE = json.dumps({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."})


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path, _ = tiny_checkpoint(tmp_path_factory.mktemp("hostile") / "base", vocab_size=151936, tie_word_embeddings=True)
    return path


def _copy(base, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(base, model)
    return model


def _deep_header(file):
    """model.safetensors whose header holds one value nested DEEP levels (its length kept valid)."""
    raw = file.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    blob = json.dumps(header)[:-1] + ', "__metadata__": {"x": ' + DEEP_JSON + "}}"
    file.write_bytes(struct.pack("<Q", len(blob)) + blob.encode() + raw[8 + n:])


def _data(tmp_path, name, line):
    file = tmp_path / name
    file.write_text(line + "\n", encoding="utf-8")
    return file


# Each case: (script, files to write given (tmp_path, model dir) -> (argv, the file the line must name)).
def _sft_data(tmp_path, model):
    file = _data(tmp_path, "train.jsonl", SFT_LINE + "\n" + '{"messages": ' + DEEP_JSON + "}")
    return "sft.py", ["--data", file], "train.jsonl"


def _cpt_data(tmp_path, model):
    file = _data(tmp_path, "docs.jsonl", json.dumps({"text": "a"}) + "\n" + '{"text": ' + DEEP_JSON + "}")
    return "cpt.py", ["--data", file, "--block-size", "32"], "docs.jsonl"


def _dpo_data(tmp_path, model):
    file = _data(tmp_path, "pairs.jsonl", DPO_LINE + "\n" + '{"prompt": ' + DEEP_JSON + "}")
    return "dpo.py", ["--data", file], "pairs.jsonl"


def _config_yaml(tmp_path, model):
    file = _data(tmp_path, "recipe.yaml", "lora_r: " + DEEP_JSON)
    return "sft.py", ["--config", file], "recipe.yaml"


def _config_json(tmp_path, model):
    file = _data(tmp_path, "recipe.json", '{"lora_r": ' + DEEP_JSON + "}")
    return "sft.py", ["--config", file], "recipe.json"


def _run_json(tmp_path, model):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text('{"written_by": "qwen-tune", "identity": ' + DEEP_JSON + "}")
    return "sft.py", ["--data", _data(tmp_path, "t.jsonl", SFT_LINE), "--resume"], "run.json"


def _model_file(name, text):
    def case(tmp_path, model):
        (model / name).write_text(text)
        return "sft.py", ["--data", _data(tmp_path, "t.jsonl", SFT_LINE)], name
    return case


def _safetensors_header(tmp_path, model):
    _deep_header(model / "model.safetensors")
    return "sft.py", ["--data", _data(tmp_path, "t.jsonl", SFT_LINE)], "model.safetensors"


def _adapter_config(tmp_path, model):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(DEEP_JSON)
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    return "merge.py", ["--adapter", adapter, "--out", tmp_path / "merged"], "adapter_config.json"


READERS = {
    "sft-data": _sft_data, "cpt-data": _cpt_data, "dpo-data": _dpo_data, "config-yaml": _config_yaml,
    "config-json": _config_json, "run.json": _run_json,
    "config.json": _model_file("config.json", DEEP_JSON),
    "tokenizer.json": _model_file("tokenizer.json", '{"model": ' + DEEP_JSON + "}"),
    "tokenizer_config.json": _model_file("tokenizer_config.json", '{"added_tokens_decoder": ' + DEEP_JSON + "}"),
    "safetensors-index": _model_file("model.safetensors.index.json", '{"weight_map": ' + DEEP_JSON + "}"),
    "safetensors-header": _safetensors_header, "adapter_config.json": _adapter_config,
}


@pytest.mark.parametrize("reader", sorted(READERS))
def test_json_or_yaml_nested_thousands_deep_is_one_line_naming_the_file(reader, base, tmp_path):
    model = _copy(base, tmp_path)
    name, argv, file = READERS[reader](tmp_path, model)
    if "--out" not in argv:
        argv += ["--out", tmp_path / "out", "--max-steps", "1"]
    proc = run_script(name, "--model", model, *argv, cache=tmp_path / "cache", timeout=120)
    line = assert_usage_error(proc, file)
    assert "nested deeper than" in line or "expected" in line, line


# The other values (NaN, 2.5, 10**30, ...) are checked in-process: tests/models/test_config.py.
@pytest.mark.parametrize("value", ["Infinity", "true", "1e400"])
def test_config_json_number_that_no_model_has_is_named_with_its_key(value, base, tmp_path):
    model = _copy(base, tmp_path)
    cfg = (model / "config.json").read_text()
    (model / "config.json").write_text(cfg.replace('"vocab_size": 151936', f'"vocab_size": {value}'))
    proc = run_script("sft.py", "--model", model, "--data", _data(tmp_path, "t.jsonl", SFT_LINE),
                      "--out", tmp_path / "out", "--max-steps", "1", cache=tmp_path / "cache", timeout=120)
    assert_usage_error(proc, "config.json", "vocab_size")


@pytest.mark.parametrize("text", ['"a string"', '{"written_by": "qwen-tune", "identity": "x"}'])
def test_run_json_that_is_not_an_object_is_one_line(text, base, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text(text)
    proc = run_script("sft.py", "--model", base, "--data", _data(tmp_path, "t.jsonl", SFT_LINE), "--out", out,
                      "--resume", "--max-steps", "1", cache=tmp_path / "cache", timeout=120)
    assert_usage_error(proc, str(out))


@pytest.mark.parametrize("text", ["1: 2", "dataset: [[a]]"])
def test_config_file_whose_keys_are_not_names_is_one_line(text, base, tmp_path):
    recipe = _data(tmp_path, "recipe.yaml", text)
    proc = run_script("sft.py", "--config", recipe, "--model", base, "--out", tmp_path / "out", timeout=120)
    assert_usage_error(proc, "recipe.yaml")


def _cut_first(lines):
    return lines[:1000]


# A missing rank, a missing byte, a gap before the added tokens: tests/models/test_tokenizer.py.
@pytest.mark.parametrize("damage", [_cut_first], ids=["cut-to-1000-lines"])
def test_tiktoken_vocabulary_that_cannot_decode_every_id_is_refused_at_load(damage, base, tmp_path):
    from models.qwen.tokenizer import Tokenizer

    model = _copy(base, tmp_path)
    Tokenizer.default().save_pretrained(model)
    vocab = model / "qwen.tiktoken"
    vocab.write_bytes(b"".join(damage(vocab.read_bytes().splitlines(keepends=True))))
    proc = run_script("generate.py", "--model", model, "--prompt", "Hi", "--max-new-tokens", "2", timeout=120)
    assert_usage_error(proc, "qwen.tiktoken")


# ---------------------------------------------------------------------- hangs
@pytest.mark.parametrize("script,key,value", [
    ("sft.py", "num_hidden_layers", 1_000_000_000),
    ("sft.py", "num_experts", 1_000_000),
    ("generate.py", "num_hidden_layers", 1_000_000_000),
])
def test_config_claiming_more_than_the_weights_hold_is_refused_before_building(script, key, value, base, tmp_path):
    model = _copy(base, tmp_path)
    cfg = json.loads((model / "config.json").read_text())
    cfg[key] = value
    if key == "num_experts":   # a MoE config over dense weights: experts the shards do not hold
        cfg.update(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], num_experts_per_tok=2,
                   moe_intermediate_size=8)
    (model / "config.json").write_text(json.dumps(cfg))
    argv = {"sft.py": ["--data", _data(tmp_path, "t.jsonl", SFT_LINE)],
            "generate.py": ["--prompt", "Hi", "--max-new-tokens", "2"]}[script]
    if script != "generate.py":
        argv += ["--out", tmp_path / "out", "--max-steps", "1"]
    proc = run_script(script, "--model", model, *argv, cache=tmp_path / "cache", timeout=60)
    assert_usage_error(proc, "config.json", key, "hold")


# range(10**12), 'x' * 10**12 and gigabytes of output: tests/models/test_chat_template.py.
@pytest.mark.parametrize("template", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",   # 10**10 steps
], ids=["nested-loops"])
def test_chat_template_that_never_finishes_is_stopped_and_named(template, base, tmp_path):
    from models.qwen.tokenizer import Tokenizer

    model = _copy(base, tmp_path)
    Tokenizer.default().save_pretrained(model)
    (model / "chat_template.jinja").write_text(template)
    proc = run_script("sft.py", "--model", model, "--data", _data(tmp_path, "t.jsonl", SFT_LINE), "--out",
                      tmp_path / "out", "--max-steps", "1", cache=tmp_path / "cache", timeout=90)
    assert_usage_error(proc, "chat_template.jinja")


# ---------------------------------------------------------------------- resume on changed inputs
@pytest.fixture(scope="module")
def finished_sft(base, tmp_path_factory):
    """An SFT run that saved checkpoints, and its inputs: model (with tokenizer files), data, eval data."""
    from models.qwen.tokenizer import Tokenizer

    tmp = tmp_path_factory.mktemp("resume")
    model = tmp / "model"
    shutil.copytree(base, model)
    Tokenizer.default().save_pretrained(model)
    train = _data(tmp, "train.jsonl", "\n".join([SFT_LINE] * 8))
    held = _data(tmp, "eval.jsonl", "\n".join([SFT_LINE] * 2))
    argv = ["--model", model, "--data", train, "--eval-data", held, "--out", tmp / "out", "--max-steps", "2",
            "--save-every", "1", "--batch-size", "2", "--lora-r", "4", "--dtype", "fp32", "--sample-questions", "0"]
    proc = run_script("sft.py", *argv, cache=tmp / "cache", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"argv": argv, "model": model, "train": train, "held": held, "cache": tmp / "cache"}


def _other_weights(run):
    file = run["model"] / "model.safetensors"
    raw = bytearray(file.read_bytes())
    raw[-4:] = bytes(4)   # the last float of the last tensor: same header, same size, other weights
    file.write_bytes(bytes(raw))
    return "model.safetensors"


def _other_data(run):
    run["train"].write_text(run["train"].read_text().replace("Hello.", "Howdy."))   # same 8 examples
    return "train.jsonl"


def _other_eval_data(run):
    run["held"].write_text(run["held"].read_text().replace("Hello.", "Howdy."))
    return "eval.jsonl"


def _other_tokenizer(run):
    file = run["model"] / "tokenizer_config.json"
    file.write_text(file.read_text().replace('"model_max_length": 131072', '"model_max_length": 4096'))
    return "tokenizer_config.json"


def _other_template(run):
    (run["model"] / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    return "chat_template.jinja"


@pytest.mark.slow   # the run it resumes trains first (~20 s on 2 cores)
@pytest.mark.parametrize("change", [_other_weights, _other_data, _other_eval_data, _other_tokenizer, _other_template],
                         ids=["weights", "data", "eval-data", "tokenizer", "chat-template"])
def test_resume_refuses_inputs_replaced_in_place_naming_which(change, finished_sft):
    run = finished_sft
    files = [p for d in (run["model"],) for p in d.iterdir()] + [run["train"], run["held"]]
    saved = {p: p.read_bytes() for p in files}
    try:
        name = change(run)
        proc = run_script("sft.py", *run["argv"], "--resume", cache=run["cache"], timeout=120)
        assert_usage_error(proc, "--resume", name, "changed" if name != "chat_template.jinja" else "new")
    finally:
        for p in set(run["model"].iterdir()) - set(saved):
            p.unlink()
        for p, raw in saved.items():
            p.write_bytes(raw)


@pytest.mark.slow
def test_resume_on_unchanged_inputs_is_accepted(finished_sft):
    run = finished_sft
    proc = run_script("sft.py", *run["argv"], "--resume", cache=run["cache"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
