"""SFT and DPO data with content parts, Qwen3.5-generation XML tool calls and chat-template
variables (per run and per record), against transformers' apply_chat_template; media parts
refused in one line naming file, line and part.

The reference ids are transformers' for the same directory (Qwen's vocabulary with the real
Qwen3.6 template); the reference labels are its tokens overlapping the assistant turns found
by string search in its rendered text (tests/models/tokenizer_dirs.reference_assistant_mask).
"""

from __future__ import annotations

import json

import pytest

from data import DataError, PreferenceDataset, SFTDataset
from tests.data.conftest import write_jsonl
from tests.models.tokenizer_dirs import (
    PARIS_CALL as CALL,
    QWEN36_TEMPLATE,
    WEATHER_TOOLS as TOOLS,
    load_both,
    reference_assistant_mask,
    save_base,
    text_part as text,
    tokenizer_dir,
)


@pytest.fixture(scope="module")
def qwen36(tmp_path_factory):
    base = save_base(tmp_path_factory)
    return load_both(tokenizer_dir(base, tmp_path_factory.mktemp("q36") / "tok", QWEN36_TEMPLATE, qwen3_tokens=True))


# Reasoning on an answer before the last question: Qwen3.6 renders it only with preserve_thinking.
CHAT = [
    {"role": "user", "content": [text("Weather in Paris?"), text(" Briefly.")]},
    {"role": "assistant", "content": "", "reasoning_content": "Call the tool.", "tool_calls": [CALL]},
    {"role": "tool", "content": "18 C"},
    {"role": "assistant", "content": [text("18 °C in Paris.")], "reasoning_content": "Got it."},
    {"role": "user", "content": "And tomorrow?"},
    {"role": "assistant", "content": "I cannot tell yet.", "reasoning_content": "No forecast tool."},
]


def reference(hf, messages, tools=None, **kwargs):
    """transformers' (ids, labels) of a conversation: labels on the assistant turns."""
    rendered = hf.apply_chat_template(messages, tools=tools, tokenize=False, **kwargs)
    ids, mask = reference_assistant_mask(hf, rendered)
    assert ids == hf.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=False, **kwargs)
    return ids, [t if m else -100 for t, m in zip(ids, mask)]


def test_sft_per_record_kwargs_override_the_run(qwen36, tmp_path):
    ours, hf = qwen36
    path = write_jsonl(tmp_path / "sft.jsonl", [
        {"messages": CHAT, "tools": TOOLS},                                               # the run's preserve_thinking
        {"messages": CHAT, "tools": TOOLS, "chat_template_kwargs": {"preserve_thinking": False}},  # overridden
    ])
    ds = SFTDataset(path, ours, max_len=None, chat_template_kwargs={"preserve_thinking": True})
    for i, kwargs in enumerate(({"preserve_thinking": True}, {"preserve_thinking": False})):
        ids, labels = reference(hf, CHAT, TOOLS, **kwargs)
        assert ds[i]["input_ids"].tolist() == ids and ds[i]["labels"].tolist() == labels
    kept = [ours.decode([t for t in ds[i]["labels"].tolist() if t != -100]) for i in range(2)]
    assert "Call the tool." in kept[0] and "Call the tool." not in kept[1]  # earlier reasoning: supervised or absent
    assert "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>" in kept[1]
    assert "18 C" not in kept[0] + kept[1]  # the tool result is never supervised


def test_sft_truncation_cuts_the_last_text_part(qwen36, tmp_path):
    ours, hf = qwen36
    long = [{"role": "user", "content": [text("Summarise: "), text(" ".join(["word"] * 200))]},
            {"role": "assistant", "content": "Words."}]
    path = write_jsonl(tmp_path / "long.jsonl", [{"messages": long}])
    sample = SFTDataset(path, ours, max_len=60)[0]
    ids = sample["input_ids"].tolist()
    rendered = ours.decode(ids)
    assert len(ids) <= 60 and rendered.startswith("<|im_start|>user\nSummarise: word word")  # the first part whole
    assert 20 < rendered.count("word") < 200  # the last part cut, keeping its start
    assert ours.decode([t for t in sample["labels"].tolist() if t != -100]).endswith("Words.<|im_end|>")


def test_dpo_tool_calls_parts_and_per_record_kwargs_equal_transformers(qwen36, tmp_path):
    ours, hf = qwen36
    prompt, chosen = CHAT[:5], CHAT[5]
    rejected = {"role": "assistant", "content": [text("Sunny, surely.")], "reasoning_content": "Guess."}
    record = {"prompt": prompt, "chosen": [chosen], "rejected": [rejected], "tools": TOOLS,
              "chat_template_kwargs": {"preserve_thinking": True}}
    ds = PreferenceDataset(write_jsonl(tmp_path / "pairs.jsonl", [record]), ours, max_len=None)
    item = ds[0]
    for side, answer in (("chosen", chosen), ("rejected", rejected)):
        ids, labels = reference(hf, prompt + [answer], TOOLS, preserve_thinking=True)
        last = max(i for i, t in enumerate(labels) if t != -100) + 1   # rows end at the last scored token
        start = ids.index(151644, len(ids) - 1 - ids[::-1].index(151644))  # the last <|im_start|>
        scored = [t if i >= start else -100 for i, t in enumerate(labels)]  # only the final answer is scored
        assert item[f"{side}_input_ids"].tolist() == ids[:last]
        assert item[f"{side}_labels"].tolist() == scored[:last]
    assert "Call the tool." in ours.decode(item["chosen_input_ids"].tolist())  # the prompt kept its reasoning


IMAGE_SFT = {"messages": [{"role": "user", "content": [text("What is this?"), {"type": "image_url", "image_url": {
    "url": "cat.png"}}]}, {"role": "assistant", "content": "A cat."}]}
VIDEO_DPO = {"prompt": [{"role": "user", "content": [{"type": "video", "video": "clip.mp4"}, text("Describe.")]}],
             "chosen": "A dog runs.", "rejected": "Nothing."}


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_media_parts_name_file_line_and_part(tok, tmp_path, kind):
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    if kind == "sft":
        path = write_jsonl(tmp_path / "sft.jsonl", [good, IMAGE_SFT])
        with pytest.raises(DataError, match=r"sft\.jsonl:2: messages\[0\]: content\[1\] is an image part"):
            SFTDataset(path, tok)
    else:
        pair = {"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."}
        path = write_jsonl(tmp_path / "pairs.jsonl", [pair, pair, VIDEO_DPO])
        with pytest.raises(DataError, match=r"pairs\.jsonl:3: field 'prompt'\[0\]: content\[0\] is a video part"):
            PreferenceDataset(path, tok)


@pytest.mark.parametrize("content, message", [
    ([{"type": "text"}], r"content\[0\]: expected a text part"),
    ([{"image": "x.png"}], r"content\[0\] is an image part"),
    ([text("a"), {"type": "input_audio", "input_audio": {}}], r"content\[1\] is an audio part"),
    (42, "must be a string or a list of text parts"),
])
def test_bad_content_is_one_line(tok, content, message):
    record = {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "x"}]}
    with pytest.raises(DataError, match=message) as err:
        from data import encode_chat

        encode_chat(record, tok, where="f.jsonl:7")
    assert "\n" not in str(err.value) and str(err.value).startswith("f.jsonl:7: messages[0]: ")


@pytest.mark.parametrize("value, message", [
    ([1], "chat_template_kwargs.: expected a JSON object"), ({"tools": []}, "'tools' is set by qwen-tune itself")])
def test_bad_record_kwargs_are_one_line(tok, tmp_path, value, message):
    record = dict(IMAGE_SFT, messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                  chat_template_kwargs=value)
    with pytest.raises(DataError, match=message):
        SFTDataset(write_jsonl(tmp_path / "k.jsonl", [json.loads(json.dumps(record))]), tok)
