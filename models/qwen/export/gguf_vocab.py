"""The tokenizer of a model directory as GGUF's `tokenizer.ggml.*` metadata, as llama.cpp writes it.

llama.cpp's convert_hf_to_gguf.py (`_set_vocab_gpt2` / `get_vocab_base`) writes Qwen2/Qwen3 as:

* `tokenizer.ggml.model = "gpt2"`, `tokenizer.ggml.pre = "qwen2"` (Qwen's pre-tokeniser regex);
* one token per embedding row: BPE tokens in their byte-level spelling (vocab.json's, e.g.
  "Ġworld"), added tokens as their text, and rows no token uses as "[PAD{id}]" (type UNUSED);
* token types: NORMAL for BPE tokens; CONTROL for added tokens marked special *or* that look
  special ("<|...|>", so Qwen's non-special <|fim_prefix|> is CONTROL too); USER_DEFINED for
  the other added tokens (<tool_call>, <think>, vocabulary extensions);
* merges as the directory's tokenizer.json (or merges.txt) lists them, "a b" per merge;
* bos / eos / pad ids (config.json's, else the tokenizer's: eos is <|im_end|> for a chat-tuned
  model), add_bos_token = false, and the chat template.

The vocabulary is read with our `Tokenizer` (qwen.tiktoken, tokenizer.json or vocab.json +
merges.txt); transformers is not needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import gguf

from ..config import QwenConfig
from ..tokenizer import Tokenizer, TokenizerError, token_to_unicode
from .errors import ExportError

TOKENIZER_MODEL = "gpt2"  # byte-level BPE in llama.cpp's vocabulary loader
TOKENIZER_PRE = "qwen2"   # llama.cpp's name for Qwen's pre-tokeniser regex (Qwen2, Qwen2.5, Qwen3)


@dataclass
class GGUFVocab:
    """What goes into the `tokenizer.ggml.*` keys; `tokens` and `token_types` have one entry per row."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: Optional[int]
    eos_id: int
    pad_id: Optional[int]
    chat_template: Optional[str]

    def add_to(self, writer: "gguf.GGUFWriter") -> None:
        writer.add_tokenizer_model(TOKENIZER_MODEL)
        writer.add_tokenizer_pre(TOKENIZER_PRE)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        writer.add_token_merges(self.merges)
        if self.bos_id is not None:
            writer.add_bos_token_id(self.bos_id)
        writer.add_eos_token_id(self.eos_id)
        if self.pad_id is not None:
            writer.add_pad_token_id(self.pad_id)
        writer.add_add_bos_token(False)  # Qwen has no BOS: text starts with its first token
        if self.chat_template is not None:
            writer.add_chat_template(self.chat_template)


def looks_special(text: str) -> bool:
    """llama.cpp's `does_token_look_special`: added tokens that behave as control tokens."""
    return (
        text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<｜") and text.endswith("｜>"))
        or (text.startswith("<unused") and text.endswith(">"))
    )


def read_vocab(model_dir: Path, config: QwenConfig) -> GGUFVocab:
    """The GGUF vocabulary of `model_dir`, padded to the model's `config.vocab_size` rows."""
    try:
        tok = Tokenizer.from_pretrained(model_dir)
    except TokenizerError as e:
        raise ExportError(f"{model_dir}: a GGUF needs the model's tokenizer: {e}") from None
    rows = config.vocab_size
    if len(tok) > rows:
        raise ExportError(
            f"{model_dir}: the tokenizer has {len(tok)} tokens but config.json vocab_size is {rows}: "
            f"every token needs an embedding row"
        )
    added = {t.id: t for t in tok.added_tokens}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(rows):
        if i in added:
            text = added[i].content
            if added[i].special or looks_special(text):
                tokens.append(text)
                types.append(gguf.TokenType.CONTROL)
            else:
                tokens.append(text.replace("\u2581", " "))  # llama.cpp pre-normalises "▁" spaces
                types.append(gguf.TokenType.USER_DEFINED)
            continue
        try:
            piece = tok.token_bytes(i)
        except KeyError:  # a row no token uses (Qwen: 151665..151935)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(token_to_unicode(piece))
        types.append(gguf.TokenType.NORMAL)

    # config.json decides (it is what generation stops on); the tokenizer config fills gaps.
    # Qwen's configs name <|endoftext|> as bos; without one llama.cpp would fall back to id 11
    # (","). add_bos_token is false either way: no BOS is ever prepended.
    bos = config.bos_token_id if config.bos_token_id is not None else tok.endoftext_id
    eos = config.eos_ids()[0] if config.eos_token_id is not None else tok.eos_id
    pad = config.pad_token_id if config.pad_token_id is not None else tok.pad_id
    return GGUFVocab(
        tokens=tokens,
        token_types=types,
        merges=_merges(model_dir, tok),
        bos_id=_checked_id(bos, "bos_token_id", model_dir, rows),
        eos_id=_checked_id(eos, "eos_token_id", model_dir, rows),
        pad_id=_checked_id(pad, "pad_token_id", model_dir, rows),
        chat_template=tok.chat_template,
    )


def _merges(model_dir: Path, tok: Tokenizer) -> list[str]:
    """The BPE merges as llama.cpp reads them (tokenizer.json, else merges.txt); from the
    ranks when the directory has neither (a qwen.tiktoken tokenizer)."""
    merges = gguf.SpecialVocab(model_dir, load_merges=True).merges
    if merges:
        return list(merges)
    return [f"{token_to_unicode(a)} {token_to_unicode(b)}" for a, b in tok.merges()]


def _checked_id(value, what: str, model_dir: Path, rows: int) -> Optional[int]:
    if value is None:
        return None
    if not isinstance(value, int) or not 0 <= value < rows:
        raise ExportError(f"{model_dir}: {what} {value!r} is not a token id below vocab_size {rows}")
    return value
