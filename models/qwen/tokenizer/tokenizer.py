"""The Tokenizer: Qwen's byte-level BPE (tiktoken) + added tokens + the model's chat template.

    tok = Tokenizer.from_pretrained("path/to/Qwen2.5-7B-Instruct")   # or Tokenizer.default()
    tok.encode("Hello world") == [9707, 1879];  tok.decode(ids)
    ids = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
    ids, mask = tok.apply_chat_template(messages, return_assistant_mask=True)   # SFT labels

Encoding: text is NFC-normalised (as Qwen's HF and v1 tokenizers do), so ids match theirs and
decode(encode(x)) == x for NFC text. Added *text* tokens (``<tool_call>``, ``<|fim_prefix|>``,
``<think>``, vocabulary extensions) are matched in every encode, as transformers does; control
tokens (``<|im_end|>``) typed in text stay plain text unless ``allowed_special`` says otherwise.
Chat rendering is `apply_chat_template` (see models/qwen/chat_template.py and chat.py here).
"""

from __future__ import annotations

import hashlib
import json
import os
import unicodedata
import warnings
from pathlib import Path
from typing import Any, Dict, FrozenSet, Iterable, List, Optional, Sequence, Tuple, Union

from ..chat_template import (
    CHATML_FALLBACK,
    CHATML_TEMPLATE,
    QWEN25_CHAT_TEMPLATE,
    ChatTemplateError,
    ChatTemplateFallbackWarning,
    has_content_parts,
    join_text_parts,
    mark_special_text,
    prepare_messages,
    prepare_tools,
    render,
    select_template,
)
from .added_tokens import AddedToken, AddedTokenMatcher
from .bpe_files import load_tiktoken_ranks, tokenizer_json
from .chat import assistant_spans, encode_rendered, mask_of
from .directory import read_directory, tokenizer_config, write_directory
from .engine import SharedRanks, bpe_encoding, shared_ranks_of_file
from .errors import TokenizerError
from .merges import recover_merges
from .qwen_vocab import (
    ENDOFTEXT,
    FIRST_SPECIAL_ID,
    IM_END,
    IM_START,
    QWEN25_ADDED_TOKENS,
    QWEN25_MODEL_MAX_LENGTH,
    QWEN_PATTERN,
    default_tiktoken_path,
)

TokenIds = Union[Sequence[int], Any]  # list/tuple of ints, 1-D torch tensor or numpy array
ChatTemplate = Union[str, Dict[str, str]]
# Options of transformers' apply_chat_template that this one does not have (refused, not ignored).
_UNSUPPORTED_CHAT_OPTIONS = ("continue_final_message", "chat_template", "return_dict", "return_tensors", "padding",
                             "truncation", "max_length", "tokenizer_kwargs", "return_assistant_tokens_mask")


class Tokenizer:
    """tiktoken-backed Qwen tokenizer: BPE ranks + added tokens + a chat template.

    mergeable_ranks: {token bytes: id} of the byte-level BPE (ids 0..151642 for Qwen).
    added_tokens: tokens outside the BPE (ids from 151643 for Qwen); control tokens (special)
        are split out of text only when allowed, text tokens always (models/qwen/tokenizer/added_tokens.py).
    chat_template: the Jinja template (or named templates) apply_chat_template renders and
        save_pretrained writes; None: plain ChatML. chat_template_source says where it came from.
    eos_token / pad_token: names of added tokens (default <|endoftext|> for both).
    """

    def __init__(
        self,
        mergeable_ranks: Dict[bytes, int],
        added_tokens: Iterable[AddedToken],
        pattern: str = QWEN_PATTERN,
        chat_template: Optional[ChatTemplate] = None,
        eos_token: str = ENDOFTEXT,
        pad_token: str = ENDOFTEXT,
        model_max_length: int = QWEN25_MODEL_MAX_LENGTH,
        normalize_nfc: bool = True,
        name: str = "qwen",
        chat_template_source: Optional[str] = None,
        _shared: Optional[SharedRanks] = None,
    ):
        self.added_tokens: List[AddedToken] = sorted(added_tokens, key=lambda t: t.id)
        ids: Dict[str, int] = {}
        for t in self.added_tokens:
            if t.content in ids:
                raise TokenizerError(f"added token {t.content!r} listed twice (ids {ids[t.content]} and {t.id})")
            ids[t.content] = t.id
        rank_ids = set(mergeable_ranks.values())
        clash = [t for t in self.added_tokens if t.id in rank_ids]
        if clash:
            raise TokenizerError(f"added token {clash[0].content!r} has id {clash[0].id}, which is a BPE token id")
        for required in (ENDOFTEXT, IM_START, IM_END):
            if required not in ids:
                raise TokenizerError(f"the tokenizer has no {required!r} token: a Qwen tokenizer needs {ENDOFTEXT}, {IM_START}, {IM_END}")
        self._special = ids  # every added token, control and text
        self._text = {t.content: t.id for t in self.added_tokens if t.is_text}
        self._control = {c: i for c, i in ids.items() if c not in self._text}
        for text in self._text:
            inside = [c for c in self._control if c in text]
            if inside:
                raise TokenizerError(f"added text token {text!r} contains the special token {inside[0]!r}")
        self._text_bytes = {i: c.encode("utf-8") for c, i in self._text.items()}
        self.matcher = AddedTokenMatcher(self.added_tokens)
        self._name = name
        self.pattern = pattern
        if chat_template is None:
            chat_template, chat_template_source = CHATML_TEMPLATE, f"{CHATML_FALLBACK} (no chat template given)"
        self.chat_template: ChatTemplate = chat_template
        self.chat_template_source: str = chat_template_source or "chat template given to Tokenizer()"
        self.model_max_length = int(model_max_length)
        self.normalize_nfc = normalize_nfc
        shared = _shared or SharedRanks(mergeable_ranks)
        self._shared = shared
        self.ranks = shared.value  # shared by every Tokenizer of the same file (150k entries)
        # tiktoken knows only the control tokens, so adding text tokens never rebuilds its
        # 150k-rank Encoding; text tokens are matched by self.matcher before BPE.
        self.bpe = bpe_encoding(name, id(shared), pattern, tuple(sorted(self._control.items())), shared)
        self._n_vocab = max(max(rank_ids), max(ids.values())) + 1
        self._lengths: Optional[List[int]] = None  # token byte lengths, see token_lengths
        self.eos_token = self._check_token(eos_token, "eos_token")
        self.pad_token = self._check_token(pad_token, "pad_token")

    # ------------------------------------------------------------------ construction
    @classmethod
    def default(cls) -> "Tokenizer":
        """Qwen2.5's tokenizer: the packaged qwen.tiktoken + the 22 Qwen2.5 added tokens (len 151665)
        and Qwen2.5-Instruct's chat template.

        eos = pad = <|endoftext|> (the base-model convention; `set_eos("<|im_end|>")` for chat).
        """
        path = default_tiktoken_path()
        ranks = load_tiktoken_ranks(path)
        added = [AddedToken(FIRST_SPECIAL_ID + i, text, special) for i, (text, special) in enumerate(QWEN25_ADDED_TOKENS)]
        return cls(ranks, added, chat_template=QWEN25_CHAT_TEMPLATE,
                   chat_template_source="Qwen2.5-Instruct's template (Tokenizer.default)",
                   _shared=shared_ranks_of_file(path, ranks))

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike]) -> "Tokenizer":
        """Load from a model directory (models/qwen/tokenizer/directory.py says what is read).

        A directory without a chat template warns (ChatTemplateFallbackWarning) and renders
        plain ChatML; `chat_template_source` then starts with "ChatML fallback".
        """
        files = read_directory(path)
        if files.chat_template_source.startswith(CHATML_FALLBACK):
            warnings.warn(f"{path}: no chat template (chat_template.jinja or tokenizer_config.json 'chat_template'); "
                          "chats are rendered as plain ChatML", ChatTemplateFallbackWarning, stacklevel=2)
        return cls(files.ranks, files.added, pattern=files.pattern, chat_template=files.chat_template,
                   eos_token=files.eos_token, pad_token=files.pad_token, model_max_length=files.model_max_length,
                   normalize_nfc=files.normalize_nfc, chat_template_source=files.chat_template_source,
                   _shared=files.shared)

    def fingerprint(self) -> str:
        """sha256 of everything that decides the ids: ranks, added tokens (and how they are
        matched), pattern, normalisation. Token caches are keyed on it; eos/pad and the chat
        template do not change `encode`, so they are not part of it."""
        h = hashlib.sha256(self._shared.digest().encode())
        h.update(json.dumps([self.pattern, self.normalize_nfc, sorted(self._special.items())]).encode())
        h.update(json.dumps(sorted((t.content, t.special, t.normalized) for t in self.added_tokens)).encode())
        return h.hexdigest()

    # ------------------------------------------------------------------ vocabulary
    def __len__(self) -> int:
        """Number of token ids (151665 for Qwen2.5, 151851 for Qwen v1); model rows may be more."""
        return self._n_vocab

    @property
    def vocab_size(self) -> int:
        return self._n_vocab

    @property
    def special_tokens(self) -> Dict[str, int]:
        """All added tokens: {text: id}."""
        return dict(self._special)

    @property
    def control_tokens(self) -> Dict[str, int]:
        """The added tokens split out of text only when allowed (HF special=True): {text: id}."""
        return dict(self._control)

    @property
    def text_tokens(self) -> Dict[str, int]:
        """The added tokens matched in all text (HF special=False): {text: id}."""
        return dict(self._text)

    def check_new_token(self, token: str) -> None:
        """Raise TokenizerError if `token` cannot be added as a new text token (see with_added_tokens)."""
        if not isinstance(token, str):
            raise TokenizerError(f"new token {token!r}: expected a string, got {type(token).__name__}")
        if not token:
            raise TokenizerError("new token '' is empty")
        try:
            raw = token.encode("utf-8")
        except UnicodeEncodeError:
            raise TokenizerError(f"new token {token!r} is not valid Unicode text (lone surrogate)") from None
        if self.normalize_nfc and not unicodedata.is_normalized("NFC", token):
            raise TokenizerError(
                f"new token {token!r} is not NFC-normalised (text is NFC-normalised before matching, so it would "
                f"never match): add {unicodedata.normalize('NFC', token)!r}"
            )
        if "\n" in token or "\r" in token:
            # A line break inside an added token could span the points where long documents
            # are cut for parallel encoding (data.cpt.split_for_encoding).
            raise TokenizerError(f"new token {token!r} contains a line break")
        # The model's own added tokens (control tokens, and text tokens like <tool_call> that are
        # not vocabulary extensions) are "special" to the user; an extension is "already there".
        reserved = {t.content: t.id for t in self.added_tokens if t.special or not t.normalized}
        if token in reserved:
            raise TokenizerError(f"new token {token!r} collides with the special token {token!r} (id {reserved[token]})")
        if token in self._text:
            raise TokenizerError(f"new token {token!r} already exists (added token id {self._text[token]})")
        inside = [c for c in self._control if c in token]
        if inside:
            raise TokenizerError(
                f"new token {token!r} collides with the special token {inside[0]!r} (id {self._control[inside[0]]}), "
                "which it contains"
            )
        if raw in self.ranks:
            raise TokenizerError(f"new token {token!r} already exists (BPE token id {self.ranks[raw]})")

    def with_added_tokens(self, tokens: Sequence[str]) -> "Tokenizer":
        """A new Tokenizer with `tokens` added as text tokens (ids len(self), len(self)+1, ...).

        Like HF's ``add_tokens`` (special=False, normalized=True), they are matched in the
        text before BPE, leftmost-longest. `self` is unchanged. Errors (TokenizerError): an empty
        token, one that already exists (a BPE token or an added one), one equal to or containing
        a special token, one listed twice, one that is not NFC-normalised or holds a line break.
        """
        if isinstance(tokens, str):
            raise TypeError("with_added_tokens expects a list of tokens, not one string")
        new: List[AddedToken] = []
        for token in tokens:
            self.check_new_token(token)
            if any(t.content == token for t in new):
                raise TokenizerError(f"new token {token!r} is listed twice")
            new.append(AddedToken(len(self) + len(new), token, special=False, normalized=True))
        if not new:
            raise TokenizerError("no new tokens given")
        return Tokenizer(
            self.ranks, self.added_tokens + new, pattern=self.pattern, chat_template=self.chat_template,
            eos_token=self.eos_token, pad_token=self.pad_token, model_max_length=self.model_max_length,
            normalize_nfc=self.normalize_nfc, name=self._name, chat_template_source=self.chat_template_source,
            _shared=self._shared,
        )

    def token_to_id(self, token: str) -> int:
        """Id of an added token ("<|im_end|>") or of a single BPE token given as text."""
        if token in self._special:
            return self._special[token]
        rank = self.ranks.get(token.encode("utf-8"))
        if rank is None:
            raise KeyError(f"{token!r} is neither an added token nor a single BPE token")
        return rank

    def _check_token(self, token: str, what: str) -> str:
        if token not in self._special:
            raise TokenizerError(f"{what} {token!r} is not an added token of this tokenizer (have {sorted(self._special)[:6]}...)")
        return token

    def set_eos(self, token: str) -> "Tokenizer":
        """Make `token` (e.g. "<|im_end|>" after SFT) the eos written by save_pretrained; returns self."""
        self.eos_token = self._check_token(token, "eos token")
        return self

    @property
    def eos_id(self) -> int:
        return self._special[self.eos_token]

    @property
    def pad_id(self) -> int:
        return self._special[self.pad_token]

    @property
    def endoftext_id(self) -> int:
        return self._special[ENDOFTEXT]

    @property
    def im_start_id(self) -> int:
        return self._special[IM_START]

    @property
    def im_end_id(self) -> int:
        return self._special[IM_END]

    @property
    def bos_id(self) -> None:
        """Qwen has no BOS token."""
        return None

    # ------------------------------------------------------------------ encode / decode
    def normalize(self, text: str) -> str:
        """NFC, when this tokenizer normalises (the HF normalizer of Qwen's tokenizer.json)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        if self.normalize_nfc and not unicodedata.is_normalized("NFC", text):
            return unicodedata.normalize("NFC", text)
        return text

    def _allowed_control(self, allowed_special: Union[str, Iterable[str]]) -> FrozenSet[str]:
        """The control tokens to split out of the text for `allowed_special`."""
        if allowed_special == "all":
            return frozenset(self._control)
        allowed = {allowed_special} if isinstance(allowed_special, str) else set(allowed_special)
        unknown = allowed - set(self._special)
        if unknown:
            raise ValueError(f"allowed_special names unknown tokens {sorted(unknown)}")
        return frozenset(allowed & set(self._control))

    def encode(self, text: str, allowed_special: Union[str, Iterable[str]] = ()) -> List[int]:
        """Text -> ids. Control-token text is plain text unless allowed ("all" or a set of names);
        added text tokens are always matched, before BPE."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        pieces = self.matcher.split(text, self.normalize, self._allowed_control(allowed_special))
        if len(pieces) == 1 and isinstance(pieces[0], str):
            return self.bpe.encode_ordinary(pieces[0])
        ids: List[int] = []
        for piece in pieces:
            if isinstance(piece, str):
                ids.extend(self.bpe.encode_ordinary(piece))
            else:
                ids.append(piece)
        return ids

    def encode_batch(self, texts: Sequence[str], num_threads: Optional[int] = None,
                     allowed_special: Union[str, Iterable[str]] = ()) -> List[List[int]]:
        """Many texts at once through tiktoken's threaded batch API (the GIL is released in Rust)."""
        threads = num_threads or os.cpu_count() or 1
        allowed = self._allowed_control(allowed_special)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"encode expects str, got {type(t).__name__}")
        split = [self.matcher.split(t, self.normalize, allowed) for t in texts]
        plain = iter(self.bpe.encode_ordinary_batch(
            [p for pieces in split for p in pieces if isinstance(p, str)], num_threads=threads))
        out = []
        for pieces in split:
            if len(pieces) == 1 and isinstance(pieces[0], str):  # no added tokens: tiktoken's list as is
                out.append(next(plain))
                continue
            ids: List[int] = []
            for p in pieces:
                if isinstance(p, str):
                    ids.extend(next(plain))
                else:
                    ids.append(p)
            out.append(ids)
        return out

    def decode(self, ids: TokenIds, skip_special_tokens: bool = False, errors: str = "replace") -> str:
        """Ids -> text. Ids at or past len(self) (untrained embedding rows) decode to nothing, as in HF.

        skip_special_tokens drops control tokens; added text tokens are text and stay.
        """
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        out = []
        special_ids = set(self._control.values()) if skip_special_tokens else ()
        for i in ids:
            if isinstance(i, (list, tuple)):
                raise ValueError("decode expects one sequence of ids (1-D), got a nested sequence")
            i = int(i)
            if i < 0:
                raise ValueError(f"cannot decode negative token id {i}")
            if i >= self._n_vocab or i in special_ids:
                continue
            out.append(i)
        chunks, run = [], []
        for i in out:
            text = self._text_bytes.get(i)
            if text is None:
                run.append(i)
                continue
            if run:
                chunks.append(self.bpe.decode_bytes(run))
                run = []
            chunks.append(text)
        if run:
            chunks.append(self.bpe.decode_bytes(run))
        return b"".join(chunks).decode("utf-8", errors=errors)

    def token_lengths(self, ids: Sequence[int]) -> List[int]:
        """The byte length of each token of `ids` (for offsets; a table built on first use)."""
        if self._lengths is None:
            lengths = list(self._shared.token_lengths())
            lengths += [0] * (self._n_vocab - len(lengths))
            for t in self.added_tokens:
                lengths[t.id] = len(t.content.encode("utf-8"))
            self._lengths = lengths
        return [self._lengths[i] for i in ids]

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (added tokens: their text)."""
        text = self._text_bytes.get(int(token_id))
        if text is not None:
            return text
        return self.bpe.decode_single_token_bytes(int(token_id))

    # ------------------------------------------------------------------ chat
    @property
    def special_tokens_map(self) -> Dict[str, str]:
        """The named special tokens a chat template sees as variables (as transformers passes them)."""
        return {"eos_token": self.eos_token, "pad_token": self.pad_token}

    def apply_chat_template(
        self,
        messages: Sequence[dict],
        tools: Optional[Sequence[dict]] = None,
        add_generation_prompt: bool = False,
        enable_thinking: Optional[bool] = None,
        tokenize: bool = True,
        return_assistant_mask: bool = False,
        sanitize_special_tokens: bool = True,
        documents: Optional[Sequence[dict]] = None,
        **kwargs: Any,
    ):
        """Render the chat template this tokenizer carries, as transformers' apply_chat_template does.

        messages: [{"role", "content", optional "tool_calls", "reasoning_content", ...}, ...]; content
            a string or a list of parts ({"type": "text", "text": ...}), given to the template as
            it is (Qwen3.5's renders parts itself). A template that cannot render parts
            (Qwen2.5's, Qwen3's: transformers raises) gets text parts joined by "\\n" (see
            `_render_chat`).
        tools: JSON-schema dicts ({"type": "function", "function": {...}}) for the template.
        enable_thinking: passed to the template when not None (Qwen3: False adds an empty think
            block to the generation prompt). Other keywords are template variables too.
        tokenize=False: the rendered string (transformers' tokenize=False output).
        tokenize=True: the ids (transformers' ids for the same call). sanitize_special_tokens
            (default True): special-token text (HF special=True, e.g. "<|im_end|>") inside the
            caller's strings is encoded as text, not as control tokens, so a message cannot
            forge a turn; the ids are then those of transformers'
            ``apply_chat_template(..., sanitize_control_tokens=True)`` on a tokenizer whose
            ``chat_control_tokens`` is [] (only special tokens sanitised: text tokens such as
            ``<tool_call>`` and ``<think>`` stay single ids). Without such text they equal plain
            transformers ids. False: exactly transformers' default (trusted text).
        return_assistant_mask (tokenize=True): also return 0/1 per id, 1 on every assistant
            turn as rendered through its <|im_end|> (models/qwen/tokenizer/chat.py gives the
            method; ChatTemplateError when the template's output does not show the turns).
        """
        unsupported = [k for k in _UNSUPPORTED_CHAT_OPTIONS if k in kwargs]
        if unsupported:
            raise TypeError(f"apply_chat_template does not support {unsupported[0]!r}")
        if return_assistant_mask and not tokenize:
            raise ValueError("return_assistant_mask needs tokenize=True")
        source = self.chat_template_source
        chat = prepare_messages(messages)
        tool_list = prepare_tools(tools)
        template = select_template(self.chat_template, tool_list, source)
        if enable_thinking is not None:
            kwargs["enable_thinking"] = enable_thinking
        variables = {**self.special_tokens_map, **kwargs}
        if not tokenize:
            return _render_chat(template, chat, tool_list, documents, add_generation_prompt, variables, source)
        marked = sanitize_special_tokens
        if marked:
            specials = list(self._control)
            chat = mark_special_text(chat, specials)
            tool_list = mark_special_text(tool_list, specials)
            documents = mark_special_text(documents, specials)
            variables = {**self.special_tokens_map, **mark_special_text(kwargs, specials)}
        rendered = _render_chat(template, chat, tool_list, documents, add_generation_prompt, variables, source)
        runs = encode_rendered(self, rendered, marked)
        ids = [i for run in runs for i in run.ids]
        if not return_assistant_mask:
            return ids
        n_assistant = sum(1 for m in chat if m["role"] == "assistant")
        spans = assistant_spans(self, rendered, runs, n_assistant, add_generation_prompt, source)
        return ids, mask_of(runs, spans)

    # ------------------------------------------------------------------ saving
    def merges(self) -> List[Tuple[bytes, bytes]]:
        """The BPE merges (recovered from the ranks once, ~2 s for Qwen's 151k tokens)."""
        if self._shared.merges is None:  # cached on the shared ranks: every checkpoint save reuses it
            self._shared.merges = recover_merges(self.ranks)
        return self._shared.merges

    def tokenizer_config(self) -> dict:
        """The tokenizer_config.json dict (HF Qwen2Tokenizer)."""
        return tokenizer_config(self)

    def tokenizer_json(self) -> dict:
        """The tokenizer.json dict (HF tokenizers byte-level BPE with Qwen's pre-tokeniser)."""
        return tokenizer_json(self.ranks, self.merges(), self.added_tokens, self.pattern, self.normalize_nfc)

    def save_pretrained(self, path: Union[str, os.PathLike]) -> Path:
        """Write vocab.json, merges.txt, tokenizer.json, tokenizer_config.json, qwen.tiktoken.

        Our Tokenizer and transformers' AutoTokenizer both load the directory with the same ids
        and the same chat template.
        """
        return write_directory(self, path)

    def __repr__(self) -> str:
        return f"Tokenizer(len={len(self)}, eos={self.eos_token!r}, pad={self.pad_token!r}, added={len(self.added_tokens)})"


def _render_chat(template, chat, tools, documents, add_generation_prompt, variables, source) -> str:
    """`render`, and for a template that fails on content given as a list of text parts, the
    rendering with those parts joined by "\\n" (vLLM's rule for string-only templates, so the
    tuned model sees its prompts as vLLM will serve them); any other failure is raised."""
    try:
        return render(template, chat, tools, documents, add_generation_prompt, variables, source)
    except ChatTemplateError:
        if not has_content_parts(chat) or not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                for m in chat if isinstance(m.get("content"), (list, tuple)) for p in m["content"]):
            raise
    return render(template, join_text_parts(chat), tools, documents, add_generation_prompt, variables, source)
