"""Content given as a list of text parts, Qwen3.5-generation XML tool calls, and template
variables (preserve_thinking, enable_thinking), against transformers' apply_chat_template.

Each directory is Qwen's real vocabulary (plus Qwen3's four text tokens) carrying a real
template: Qwen2.5-Instruct, Qwen3, Qwen3.5, Qwen3.6 (tests/data/templates/). The reference is
transformers' AutoTokenizer of the same directory: its rendered string and ids, and for masks
the assistant turns found by string search in its text (tokenizer_dirs.reference_assistant_mask).
"""

from __future__ import annotations

import pytest

from tests.models.tokenizer_dirs import (
    QWEN3_TEMPLATE,
    QWEN25_TEMPLATE,
    QWEN35_TEMPLATE,
    QWEN36_TEMPLATE,
    load_both,
    reference_assistant_mask,
    tokenizer_dir,
)

TEMPLATES = {"qwen2.5": QWEN25_TEMPLATE, "qwen3": QWEN3_TEMPLATE, "qwen3.5": QWEN35_TEMPLATE, "qwen3.6": QWEN36_TEMPLATE}
STRING_ONLY = ("qwen2.5", "qwen3")  # templates that add content to strings: transformers raises on parts


def text(t):
    return {"type": "text", "text": t}


PARTS_CHAT = [
    {"role": "system", "content": [text("You are terse."), text(" Answer in English.")]},
    {"role": "user", "content": [text("What is a B-tree?"), text("Keep it short: 北京 style.")]},
    {"role": "assistant", "content": [text("A balanced "), text("search tree.")]},
    {"role": "user", "content": "And a heap?"},
    {"role": "assistant", "content": [text("A tree where each parent orders before its children.")]},
]

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                                    "options": {"type": "object"}}, "required": ["city"]}}}]


def call(name, **arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


# Two rounds of tool use after one question, then a second question; reasoning on every answer.
# Arguments of every JSON type: the template writes strings bare and the rest as JSON.
XML_TOOL_CHAT = [
    {"role": "user", "content": "Weather in Paris and 北京 for two days?"},
    {"role": "assistant", "content": "", "reasoning_content": "Two cities, two calls.", "tool_calls": [
        call("get_weather", city="Paris", days=2), call("get_weather", city="北京", options={"unit": "C", "hourly": [6, 12]})]},
    {"role": "tool", "content": "18 C, cloudy"},
    {"role": "tool", "content": [text("31 C, sunny")]},
    {"role": "assistant", "content": "Let me also check the alerts.", "reasoning_content": "Any warnings?",
     "tool_calls": [call("get_weather", city="Paris", days=1, options={"alerts": True})]},
    {"role": "tool", "content": "alerts: none issued"},
    {"role": "assistant", "content": "Paris 18 °C and cloudy, 北京 31 °C and sunny; no alerts.",
     "reasoning_content": "All in."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome.", "reasoning_content": "Polite close."},
]


@pytest.fixture(scope="module")
def pairs(qwen25_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("content")
    return {name: load_both(tokenizer_dir(qwen25_dir, root / name, template, qwen3_tokens=name != "qwen2.5"))
            for name, template in TEMPLATES.items()}


def joined(messages):
    """The conversation with each list of text parts joined by "\\n" (the string vLLM serves a
    string-only template with)."""
    return [{**m, "content": "\n".join(p["text"] for p in m["content"])} if isinstance(m["content"], list) else m
            for m in messages]


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_content_parts_render_as_transformers(pairs, name):
    ours, hf = pairs[name]
    if name in STRING_ONLY:
        # transformers cannot render parts with these templates; we render the joined text
        with pytest.raises(Exception):
            hf.apply_chat_template(PARTS_CHAT, tokenize=False)
        reference = hf.apply_chat_template(joined(PARTS_CHAT), tokenize=False)
    else:
        reference = hf.apply_chat_template(PARTS_CHAT, tokenize=False)
        assert "A balanced search tree." in reference and "北京 style" in reference  # parts concatenated
    assert ours.apply_chat_template(PARTS_CHAT, tokenize=False) == reference
    ids, mask = ours.apply_chat_template(PARTS_CHAT, return_assistant_mask=True)
    assert (ids, mask) == reference_assistant_mask(hf, reference)
    prompt = PARTS_CHAT[:2]
    reference = hf.apply_chat_template(joined(prompt) if name in STRING_ONLY else prompt, add_generation_prompt=True,
                                       tokenize=True, return_dict=False)
    assert ours.apply_chat_template(prompt, add_generation_prompt=True) == reference


def test_parts_that_are_not_text_are_not_joined(pairs):
    ours, _ = pairs["qwen2.5"]
    from models.qwen.chat_template import ChatTemplateError

    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]}]
    with pytest.raises(ChatTemplateError, match="TypeError"):
        ours.apply_chat_template(image, tokenize=False)


@pytest.mark.parametrize("name", ["qwen3.5", "qwen3.6"])
@pytest.mark.parametrize("kwargs", [{}, {"preserve_thinking": True}], ids=["default", "preserve_thinking"])
def test_xml_tool_calls_ids_and_masks_equal_transformers(pairs, name, kwargs):
    ours, hf = pairs[name]
    reference = hf.apply_chat_template(XML_TOOL_CHAT, tools=TOOLS, tokenize=False, **kwargs)
    assert ours.apply_chat_template(XML_TOOL_CHAT, tools=TOOLS, tokenize=False, **kwargs) == reference
    ids, mask = ours.apply_chat_template(XML_TOOL_CHAT, tools=TOOLS, return_assistant_mask=True, **kwargs)
    assert ids == hf.apply_chat_template(XML_TOOL_CHAT, tools=TOOLS, tokenize=True, return_dict=False, **kwargs)
    assert (ids, mask) == reference_assistant_mask(hf, reference)
    supervised = ours.decode([i for i, m in zip(ids, mask) if m])
    # the calls as Qwen3.5 writes them, supervised; the tool results never
    assert ("<tool_call>\n<function=get_weather>\n<parameter=city>\n北京\n</parameter>\n<parameter=options>\n"
            '{"unit": "C", "hourly": [6, 12]}\n</parameter>\n</function>\n</tool_call><|im_end|>') in supervised
    assert "<parameter=days>\n2\n</parameter>" in supervised and "18 C" not in supervised
    assert "none issued" not in supervised and "31 C" not in supervised
    assert 151657 in [i for i, m in zip(ids, mask) if m]  # <tool_call>: one supervised token
    # the reasoning of the turns before the last question: kept only with preserve_thinking
    # (Qwen3.6's variable; Qwen3.5's template does not read it)
    preserved = kwargs.get("preserve_thinking") and name == "qwen3.6"
    assert ("Two cities, two calls." in supervised) == bool(preserved)
    assert "<think>\nPolite close.\n</think>\n\nYou're welcome.<|im_end|>" in supervised


def test_enable_thinking_and_other_variables_reach_the_template(pairs):
    ours, hf = pairs["qwen3.6"]
    prompt = XML_TOOL_CHAT[:1]
    for kwargs in ({}, {"enable_thinking": False}, {"enable_thinking": True, "add_vision_id": True}):
        reference = hf.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False, **kwargs)
        assert ours.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False, **kwargs) == reference
    assert ours.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False,
                                    enable_thinking=False).endswith("<think>\n\n</think>\n\n")


@pytest.mark.parametrize("ours, trls", [("qwen3.5.jinja", "qwen3_5_think.jinja"), ("qwen3.6.jinja", "qwen3_6.jinja")])
def test_test_data_is_trls_copy_of_the_published_template(ours, trls):
    """TRL recognises Qwen3.5 / Qwen3.6 checkpoints by exact equality with these files."""
    from importlib.resources import files

    from tests.models.tokenizer_dirs import TEMPLATES as DIR

    assert (DIR / ours).read_bytes() == files("trl").joinpath("chat_templates", trls).read_bytes()
