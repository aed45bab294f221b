"""Tokenizer directories for the tokenizer and chat tests: Qwen's real vocabulary saved once by
our save_pretrained, then copied with another chat template (and Qwen3's four extra tokens).

transformers' AutoTokenizer loads every one of them; it is the reference both for ids and for
the rendering of the template the directory carries.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

TEMPLATES = Path(__file__).resolve().parent.parent / "data" / "templates"
QWEN3_TEMPLATE = (TEMPLATES / "qwen3.jinja").read_text(encoding="utf-8")
QWEN25_TEMPLATE = (TEMPLATES / "qwen2.5-instruct.jinja").read_text(encoding="utf-8")
QWEN3_EXTRA = ("<tool_response>", "</tool_response>", "<think>", "</think>")  # ids 151665..151668, special=False
BASE_FILES = ("qwen.tiktoken", "tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")


def save_base(tmp_path_factory) -> Path:
    """Qwen2.5's tokenizer (eos <|im_end|>, as after SFT), saved by our save_pretrained."""
    from models.qwen import Tokenizer

    out = tmp_path_factory.mktemp("qwen25-tok")
    Tokenizer.default().set_eos("<|im_end|>").save_pretrained(out)
    return out


def tokenizer_dir(base: Path, out: Path, template: Optional[str], qwen3_tokens: bool = False,
                  as_jinja_file: bool = False) -> Path:
    """A copy of `base` carrying `template` (None: no template at all).

    qwen3_tokens: add Qwen3's four text tokens (in tokenizer_config.json's added_tokens_decoder,
    which both loaders read). as_jinja_file: write the template to chat_template.jinja.
    """
    out.mkdir(parents=True, exist_ok=True)
    for name in BASE_FILES:
        dst = out / name
        if not dst.exists():
            try:
                dst.hardlink_to(base / name)  # the big files are never modified: share them
            except OSError:
                shutil.copy(base / name, dst)
    config = json.loads((base / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.pop("chat_template", None)
    if template is not None and not as_jinja_file:
        config["chat_template"] = template
    if template is not None and as_jinja_file:
        (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    if qwen3_tokens:
        for i, text in enumerate(QWEN3_EXTRA):
            config["added_tokens_decoder"][str(151665 + i)] = {
                "content": text, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                "special": False}
    (out / "tokenizer_config.json").unlink()  # a hard link: replace, never write through it
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
    return out


def load_both(path: Path):
    """(our Tokenizer, transformers' tokenizer) of one directory."""
    from transformers import AutoTokenizer

    from models.qwen import Tokenizer

    return Tokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(path)
QWEN35_TEMPLATE = (TEMPLATES / "qwen3.5.jinja").read_text(encoding="utf-8")
QWEN36_TEMPLATE = (TEMPLATES / "qwen3.6.jinja").read_text(encoding="utf-8")


def reference_assistant_mask(hf, text: str):
    """transformers' ids of a rendered chat `text`, and 1 for each id overlapping an assistant
    turn found by plain string search in transformers' text: from after each
    "<|im_start|>assistant\\n" through the next "<|im_end|>" (the rule the tests hold our masks to)."""
    spans, at = [], 0
    while (start := text.find("<|im_start|>assistant\n", at)) >= 0:
        start += len("<|im_start|>assistant\n")
        end = text.index("<|im_end|>", start) + len("<|im_end|>")
        spans.append((start, end))
        at = end
    enc = hf(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(s < b and e > a for a, b in spans)) for s, e in enc["offset_mapping"]]
    return enc["input_ids"], mask


def text_part(t: str) -> dict:
    """One OpenAI-style text part of a message's content."""
    return {"type": "text", "text": t}


# One tool and one call of it, for the tool-calling chats of the data and script tests.
WEATHER_TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
PARIS_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
