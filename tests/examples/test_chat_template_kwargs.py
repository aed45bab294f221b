"""sft.py and dpo.py in subprocesses with --chat-template-kwargs, per-record chat_template_kwargs,
Qwen3.5-generation XML tool calls and content parts, on a tiny model whose folder carries the
real Qwen3.6 template; media parts and bad flag values refused in one line.

What the run encoded is checked through what it reports, against transformers: sft.py's
held-out loss and supervised-token count (--eval-data = the training file) equal transformers'
model and tokenizer on the same conversations rendered with the same variables; dpo.py's first
logps/chosen and logps/rejected (one pair, fresh adapter = the base model) equal transformers'
sums of log-probs of the two answers.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from tests.examples.conftest import assert_usage_error, run_script
from tests.helpers import tiny_checkpoint
from tests.models.tokenizer_dirs import (
    PARIS_CALL as CALL,
    QWEN36_TEMPLATE,
    WEATHER_TOOLS as TOOLS,
    reference_assistant_mask,
    save_base,
    text_part as text,
    tokenizer_dir,
)

# An answer with reasoning before the last question: Qwen3.6 renders that reasoning only with
# preserve_thinking, so the variable changes the tokens of the sample.
PROMPT = [
    {"role": "user", "content": [text("Weather in Paris?"), text(" Briefly.")]},
    {"role": "assistant", "content": "", "reasoning_content": "The user wants the weather in Paris; the "
     "get_weather tool gives it, so call it with city Paris and answer in one short sentence.",
     "tool_calls": [CALL]},
    {"role": "tool", "content": "18 C"},
    {"role": "assistant", "content": [text("18 °C in Paris.")],
     "reasoning_content": "The tool answered 18 C; say it briefly, with the unit, and nothing else."},
    {"role": "user", "content": "And tomorrow?"},
]
CHOSEN = {"role": "assistant", "content": "I cannot tell yet.", "reasoning_content": "No forecast tool."}
REJECTED = {"role": "assistant", "content": [text("Sunny, surely.")], "reasoning_content": "Guess."}
RUN_KWARGS = {"preserve_thinking": True}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny Qwen2 checkpoint with Qwen's vocabulary and the real Qwen3.6 chat template."""
    tmp = tmp_path_factory.mktemp("chat-kwargs")
    path, hf = tiny_checkpoint(tmp / "model", vocab_size=151936, tie_word_embeddings=True)
    tokenizer_dir(save_base(tmp_path_factory), path, QWEN36_TEMPLATE, qwen3_tokens=True)
    from transformers import AutoTokenizer

    return path, hf, AutoTokenizer.from_pretrained(path), tmp


def reference(hf_tok, messages, **kwargs):
    """transformers' ids of the conversation and its labels (assistant turns as rendered)."""
    rendered = hf_tok.apply_chat_template(messages, tools=TOOLS, tokenize=False, **kwargs)
    ids, mask = reference_assistant_mask(hf_tok, rendered)
    return ids, [t if m else -100 for t, m in zip(ids, mask)]


def token_logps(hf_model, ids, labels):
    """Per supervised token: log p(label | prefix) under transformers' model, float64 softmax."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0, :-1].double()
    target = torch.tensor(labels[1:])
    keep = target != -100
    return torch.log_softmax(logits[keep], -1).gather(1, target[keep, None])[:, 0]


def common(model_dir, data, out, tmp, *extra):
    return ["--model", model_dir, "--data", data, "--out", out, "--max-steps", "1", "--batch-size", "1",
            "--grad-accum", "1", "--lora-r", "4", "--lora-dropout", "0", "--dtype", "fp32", "--max-len", "1024",
            "--sample-questions", "0", "--no-merge", *extra]


@pytest.mark.slow
def test_sft_run_and_record_kwargs_reach_the_encoded_samples(model, tmp_path):
    path, hf_model, hf_tok, tmp = model
    conversation = PROMPT + [CHOSEN]
    records = [{"messages": conversation, "tools": TOOLS},
               {"messages": conversation, "tools": TOOLS, "chat_template_kwargs": {"preserve_thinking": False}}]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    proc = run_script("sft.py", *common(path, data, tmp_path / "out", tmp, "--eval-data", data,
                                        "--chat-template-kwargs", json.dumps(RUN_KWARGS)), cache=tmp / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    loss, tokens = re.search(r"held-out answer loss before SFT: ([\d.]+) \(perplexity [\d.]+, ([\d,]+) supervised",
                             proc.stdout).groups()
    # reference: record 1 with the run's preserve_thinking, record 2 with its own override
    samples = [reference(hf_tok, conversation, **RUN_KWARGS), reference(hf_tok, conversation, preserve_thinking=False)]
    logps = torch.cat([token_logps(hf_model, ids, labels) for ids, labels in samples])
    assert int(tokens.replace(",", "")) == len(logps)
    assert len(logps) > 2 * sum(1 for t in samples[1][1] if t != -100)  # the run's variable added tokens
    # printed with 4 decimals (half a unit: 5e-5); our fp32 forward differs from transformers'
    # by ~1e-6 in this loss, so 1e-4 holds and a wrong token would move it by ~1e-2
    assert float(loss) == pytest.approx(float(-logps.mean()), abs=1e-4)


@pytest.mark.slow
def test_dpo_run_kwargs_tool_calls_and_parts(model, tmp_path):
    path, hf_model, hf_tok, tmp = model
    data = tmp_path / "pairs.jsonl"
    record = {"prompt": PROMPT, "chosen": [CHOSEN], "rejected": [REJECTED], "tools": TOOLS}
    data.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    proc = run_script("dpo.py", *common(path, data, tmp_path / "out", tmp, "--eval-fraction", "0",
                                        "--chat-template-kwargs", json.dumps(RUN_KWARGS)), cache=tmp / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])

    def answer_logp(answer, **kwargs):
        ids, labels = reference(hf_tok, PROMPT + [answer], **kwargs)
        start = len(ids) - 1 - ids[::-1].index(151644)  # only the final answer is scored
        return float(token_logps(hf_model, ids, [t if i > start else -100 for i, t in enumerate(labels)]).sum())

    # Summed log-probs of ~15 tokens (|sum| ~170). Measured: ours - transformers' = 2e-7..9e-6;
    # the bound is 10 x |sum| x fp32 epsilon (~2e-4), the rounding floor of an fp32 sum of
    # that size with margin. The prompt rendered without the run's variable (no earlier
    # reasoning) moves the sums by ~1e-2 (measured), over ten times the bound.
    for side, answer in (("chosen", CHOSEN), ("rejected", REJECTED)):
        expected = answer_logp(answer, **RUN_KWARGS)
        bound = 10 * abs(expected) * torch.finfo(torch.float32).eps
        assert row[f"logps/{side}"] == pytest.approx(expected, abs=bound)
        assert abs(answer_logp(answer) - expected) > 10 * bound


IMAGE_RECORD = {"messages": [{"role": "user", "content": [text("What is this?"), {"type": "image_url", "image_url": {
    "url": "cat.png"}}]}, {"role": "assistant", "content": "A cat."}]}
VIDEO_PAIR = {"prompt": [{"role": "user", "content": [text("Describe."), {"type": "video", "video": "clip.mp4"}]}],
              "chosen": "A dog runs.", "rejected": "Nothing."}


@pytest.mark.parametrize("script, record, where", [
    ("sft.py", IMAGE_RECORD, "messages[0]: content[1] is an image part"),
    ("dpo.py", VIDEO_PAIR, "field 'prompt'[0]: content[1] is a video part"),
])
def test_media_parts_are_one_line_naming_file_line_and_part(model, tmp_path, script, record, where):
    path, _, _, tmp = model
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]} \
        if script == "sft.py" else {"prompt": "Hi", "chosen": "Hello.", "rejected": "Bye."}
    data = tmp_path / "media.jsonl"
    data.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n", encoding="utf-8")
    proc = run_script(script, *common(path, data, tmp_path / "out", tmp), cache=tmp / "cache")
    assert_usage_error(proc, "media.jsonl:2", where)


BAD_VALUES = [("{bad", "not valid JSON"), ("[1]", "expected a JSON object"),
              ('{"tools": []}', "'tools' is set by qwen-tune itself")]


@pytest.mark.parametrize("script, value, needle", [("sft.py", *BAD_VALUES[0]), ("dpo.py", *BAD_VALUES[2])])
def test_bad_flag_values_are_one_line(script, value, needle, tmp_path):
    proc = run_script(script, "--chat-template-kwargs", value, cwd=tmp_path)
    assert_usage_error(proc, "--chat-template-kwargs", needle)


@pytest.mark.parametrize("script", ["sft.py", "dpo.py", "generate.py", "evaluate.py"])
@pytest.mark.parametrize("value, needle", BAD_VALUES)
def test_every_chat_stage_checks_the_flag(script, value, needle, capsys):
    from cli import flags

    with pytest.raises(SystemExit) as exit_:
        flags.parse(load_script(script).build_parser(), ["--chat-template-kwargs", value])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1
    assert "--chat-template-kwargs" in lines[0] and needle in lines[0]


def load_script(name):
    import importlib.util

    from tests.examples.conftest import EXAMPLES

    spec = importlib.util.spec_from_file_location(name.replace(".py", "_script"), EXAMPLES / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_file_gives_the_kwargs_as_a_mapping(tmp_path):
    from cli import flags

    sft = load_script("sft.py")
    config = tmp_path / "run.yaml"
    config.write_text("chat_template_kwargs:\n  preserve_thinking: true\n  enable_thinking: false\n", encoding="utf-8")
    args = flags.parse(sft.build_parser(), ["--config", str(config)], stage="sft").args
    assert args.chat_template_kwargs == {"preserve_thinking": True, "enable_thinking": False}
    args = flags.parse(sft.build_parser(), ["--config", str(config), "--chat-template-kwargs", "{}"], stage="sft").args
    assert args.chat_template_kwargs == {}  # the command line wins


def test_generate_and_evaluate_render_with_the_variables(model):
    """generate.py's prompt (cli.console.chat_ids) and evaluate.py's instructions
    (train.evaluation) carry the run's variables, a record's own winning."""
    from cli.console import chat_ids
    from models.qwen import Tokenizer
    from train.evaluation import instruction_from_example

    path, _, hf_tok, _ = model
    ours = Tokenizer.from_pretrained(path)
    for kwargs in ({}, {"enable_thinking": False}):
        expected = hf_tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False, **kwargs)
        assert chat_ids(ours, "Hi", template_kwargs=kwargs) == expected
    record = {"messages": PROMPT + [CHOSEN], "tools": TOOLS, "chat_template_kwargs": {"preserve_thinking": False}}
    instruction = instruction_from_example(record, "eval.jsonl:1")
    assert instruction.reference == "I cannot tell yet." and instruction.tools == TOOLS
    assert instruction.template_kwargs == {"preserve_thinking": False}
