"""Qwen's tokenizer. One file per concept:

    tokenizer.py      the Tokenizer class: encode / decode / apply_chat_template / save_pretrained
    qwen_vocab.py     Qwen facts: pre-tokeniser regex, control and added tokens, the packaged qwen.tiktoken
    byte_alphabet.py  GPT-2's byte <-> character map used by HF vocabulary files
    merges.py         BPE merges <-> tiktoken ranks (checking and recovering the merge list)
    bpe_files.py      reading/writing qwen.tiktoken, tokenizer.json, vocab.json + merges.txt
    added_tokens.py   added tokens: control vs text tokens, reading them, finding them in text
    directory.py      a model directory: which files are read (incl. the chat template), what is written
    engine.py         the shared tiktoken Encoding (Rust BPE) and the ranks' caches
    chat.py           a rendered chat -> ids, and the assistant mask from its ChatML turns
    errors.py         TokenizerError

Chat templates themselves (Jinja rendering as transformers does it) are models/qwen/chat_template.py.

    from models.qwen.tokenizer import Tokenizer, TokenizerError
"""

from ..chat_template import QWEN25_CHAT_TEMPLATE
from .added_tokens import AddedToken
from .bpe_files import load_tiktoken_ranks
from .byte_alphabet import bytes_to_unicode, token_to_unicode, unicode_to_token
from .directory import load_tokenizer
from .errors import TokenizerError
from .merges import ranks_from_vocab_merges, recover_merges
from .qwen_vocab import (
    ENDOFTEXT,
    IM_END,
    IM_START,
    QWEN1_SPECIAL_TOKENS,
    QWEN3_EXTRA_TOKENS,
    QWEN25_ADDED_TOKENS,
    QWEN_PATTERN,
    default_tiktoken_path,
)
from .tokenizer import Tokenizer

__all__ = [
    "Tokenizer", "TokenizerError", "AddedToken", "QWEN_PATTERN", "QWEN25_ADDED_TOKENS", "QWEN3_EXTRA_TOKENS",
    "QWEN1_SPECIAL_TOKENS", "QWEN25_CHAT_TEMPLATE", "ENDOFTEXT", "IM_START", "IM_END", "load_tiktoken_ranks",
    "ranks_from_vocab_merges", "recover_merges", "bytes_to_unicode", "token_to_unicode", "unicode_to_token",
    "default_tiktoken_path", "load_tokenizer",
]
