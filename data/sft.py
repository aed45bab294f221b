"""Instruction SFT data: records -> ids with label masks, rendered by the model's own chat template.

    ids, labels = encode_chat(example, tok, max_len=1024)
    ds = SFTDataset("train.jsonl", tok, max_len=1024)      # all records, encoded, with a report

Records (alpaca, OpenAI-style messages with tools / tool_calls / reasoning_content, ShareGPT
incl. LLaMA-Factory's function_call / observation) become conversations in
data/conversations.py. The conversation is rendered by the chat template the tokenizer carries
(the model directory's own, as transformers renders it) and tokenised as transformers does.

Labels are -100 everywhere except every assistant turn as rendered, through its closing
<|im_end|> (option: the last assistant turn only): for Qwen3 that includes the think block,
for tool calling the <tool_call> blocks; tool results, system and user turns and the role
headers are never supervised. So the last supervised label of every sample is <|im_end|>
(151645). Which tokens are assistant tokens is the tokenizer's to say (its assistant mask,
`apply_chat_template(..., return_assistant_mask=True)`, as models/qwen/tokenizer/chat.py
describes and as transformers masks); this module only turns that mask into labels and adds
the last-turn and truncation policy. A template whose output does not show the turns is an
error naming the record.

Chat-template variables (enable_thinking, preserve_thinking, ...): the run's
`chat_template_kwargs`, overridden key by key by a record's own "chat_template_kwargs".

Special-token text inside a message ("<|im_end|>" typed by a user) is encoded as plain text,
never as a control token (the tokenizer's default, sanitize_special_tokens=True).

Truncation to max_len never leaves a sample without supervised tokens: first the oldest
turns (a user message and everything up to the next one) are dropped, then the last user
message is cut (keeping its beginning, at least `min_prompt_tokens`), and if the sample still
does not fit it is an error ("too-long"), or with on_error="skip" the sample is dropped and
counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from models.qwen import IGNORE_INDEX
from models.qwen.chat_template import ChatTemplateError

from .conversations import (
    FORMATS,
    SHAREGPT_ROLES,
    Conversation,
    check_roles,
    detect_format,
    parse_message,
    to_conversation,
    to_messages,
)
from .errors import DataError, InputReport, check_on_error
from .sources import PathLike, find_files, iter_jsonl

__all__ = [
    "FORMATS", "SHAREGPT_ROLES", "IGNORE_INDEX", "Conversation", "EncodedChat", "SFTDataset", "Subset", "check_roles",
    "detect_format", "encode_chat", "encode_chat_detailed", "to_conversation", "to_messages",
]


@dataclass
class EncodedChat:
    """input_ids / labels (lists, same length) and what truncation did."""

    input_ids: List[int]
    labels: List[int]
    history_turns_dropped: int = 0
    prompt_tokens_cut: int = 0

    @property
    def n_supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def _last_run_only(mask: List[int]) -> List[int]:
    """Keep only the last run of 1s: the last assistant turn (turns are separated by their
    unsupervised <|im_start|>assistant headers)."""
    end = len(mask)
    while end and not mask[end - 1]:
        end -= 1
    start = end
    while start and mask[start - 1]:
        start -= 1
    return [0] * start + mask[start:end] + [0] * (len(mask) - end)


def labels_from_mask(ids: Sequence[int], mask: Sequence[int], last_turn_only: bool = False) -> List[int]:
    """Labels [L] from the tokenizer's assistant mask [L] (1 = assistant token): the id where
    the mask is 1, else -100; with last_turn_only, only the last assistant turn keeps its ids."""
    if last_turn_only:
        mask = _last_run_only(list(mask))
    return [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]


def _encode(conv: Conversation, tok, last_turn_only: bool, where: str, template_kwargs: Mapping[str, Any]):
    """(ids, labels) of a conversation: the tokenizer says which ids are assistant tokens."""
    try:
        ids, mask = tok.apply_chat_template(conv.messages, tools=conv.tools, tokenize=True,
                                            return_assistant_mask=True, **template_kwargs)
    except ChatTemplateError as err:
        raise DataError(f"{where}: {err}", "template") from None
    return ids, labels_from_mask(ids, mask, last_turn_only)


def run_template_kwargs(chat_template_kwargs: Optional[Mapping[str, Any]], enable_thinking: Optional[bool] = None
                        ) -> Dict[str, Any]:
    """The run's template variables: `chat_template_kwargs`, with enable_thinking when it is given."""
    out = dict(chat_template_kwargs or {})
    if enable_thinking is not None:
        out["enable_thinking"] = enable_thinking
    return out


def with_text(content: Any, part: Optional[int], text: str) -> Any:
    """`content` with its text replaced: the whole string (part None) or text part `part`."""
    if part is None:
        return text
    return content[:part] + [{"type": "text", "text": text}] + content[part + 1:]


def _turn_starts(messages: Sequence[Mapping[str, Any]]) -> List[int]:
    """Indices of the user messages: each starts a turn that runs to the next one."""
    return [i for i, m in enumerate(messages) if m["role"] == "user"]


def encode_chat_detailed(
    example: Union[Mapping[str, Any], Sequence[Mapping[str, Any]]],
    tokenizer,
    max_len: Optional[int] = None,
    fmt: Optional[str] = None,
    system: Optional[str] = None,
    last_turn_only: bool = False,
    min_prompt_tokens: int = 8,
    where: str = "example",
    enable_thinking: Optional[bool] = None,
    chat_template_kwargs: Optional[Mapping[str, Any]] = None,
) -> EncodedChat:
    """encode_chat, also saying how much was truncated (see the module docstring)."""
    if isinstance(example, (list, tuple)):
        messages = [parse_message(m, f"{where}: messages[{i}]") for i, m in enumerate(example)]
        check_roles(messages, where)
        conv = Conversation(messages)
    else:
        conv = to_conversation(example, fmt, where)
    if system is not None and conv.messages[0]["role"] != "system":
        conv = Conversation([{"role": "system", "content": system}] + conv.messages, conv.tools, conv.template_kwargs)
    template_kwargs = run_template_kwargs(chat_template_kwargs, enable_thinking) | conv.template_kwargs
    ids, labels = _encode(conv, tokenizer, last_turn_only, where, template_kwargs)
    out = EncodedChat(ids, labels)
    if max_len is None or len(ids) <= max_len:
        return out
    full_len = len(ids)
    messages = conv.messages
    # 1. drop the oldest turns, keeping the system message and the last turn
    while len(_turn_starts(messages)) > 1 and len(ids) > max_len:
        first, second = _turn_starts(messages)[:2]
        messages = messages[:first] + messages[second:]
        out.history_turns_dropped += 1
        ids, labels = _encode(Conversation(messages, conv.tools), tokenizer, last_turn_only, where, template_kwargs)
    # 2. cut the end of the last user message, keeping at least min_prompt_tokens of it
    if len(ids) > max_len:
        at = _turn_starts(messages)[-1]
        content = messages[at]["content"]
        part = len(content) - 1 if isinstance(content, list) else None  # parts: cut the last one
        content_ids = tokenizer.encode(content if part is None else content[part]["text"] if part >= 0 else "")
        keep = len(content_ids) - (len(ids) - max_len)
        while keep >= min_prompt_tokens and len(ids) > max_len:
            cut = tokenizer.decode(content_ids[:keep], errors="ignore")  # never half a character
            trial = messages[:at] + [{"role": "user", "content": with_text(content, part, cut)}] + messages[at + 1:]
            ids, labels = _encode(Conversation(trial, conv.tools), tokenizer, last_turn_only, where, template_kwargs)
            out.prompt_tokens_cut = len(content_ids) - keep
            keep -= max(1, len(ids) - max_len)
    # 3. give up: the caller raises or skips and counts it
    if len(ids) > max_len:
        raise DataError(
            f"{where}: sample is {full_len} tokens, more than max_len={max_len} even after dropping history and "
            f"cutting the prompt to {min_prompt_tokens} tokens (the last turn alone does not fit)",
            "too-long",
        )
    out.input_ids, out.labels = ids, labels
    return out


def encode_chat(
    example: Union[Mapping[str, Any], Sequence[Mapping[str, Any]]],
    tokenizer,
    max_len: Optional[int] = None,
    **kwargs: Any,
) -> Tuple[List[int], List[int]]:
    """A record (alpaca / messages / ShareGPT dict, or a list of messages) -> (input_ids, labels).

    Labels are -100 off the assistant turns; see the module docstring for truncation. Keyword
    options: fmt, system (system prompt for records without one; None: the template's own
    default), last_turn_only, min_prompt_tokens, where (location used in errors),
    enable_thinking (passed to the chat template when not None), chat_template_kwargs (template
    variables; the record's own "chat_template_kwargs" override them).
    """
    enc = encode_chat_detailed(example, tokenizer, max_len=max_len, **kwargs)
    return enc.input_ids, enc.labels


class SFTDataset(torch.utils.data.Dataset):
    """Encoded SFT samples from .jsonl/.json files; items {"input_ids", "labels"}: LongTensors [L].

    system: default system prompt for records without one: a string, or a mapping from the
        record's `task_field` value to a prompt (per-task system prompts; key None = others).
        None: the chat template's own default (Qwen2.5's writes one, Qwen3's none).
    enable_thinking: passed to the chat template when not None.
    chat_template_kwargs: template variables for every record (a record's own
        "chat_template_kwargs" override them).
    on_error: "raise" (default) or "skip" (bad and over-length records dropped and counted).
    `report` holds the counts (read, kept, skipped by reason, truncated).
    """

    def __init__(
        self,
        paths: Union[PathLike, Sequence[PathLike]],
        tokenizer,
        max_len: Optional[int] = 1024,
        fmt: Optional[str] = None,
        system: Union[None, str, Mapping[Optional[str], str]] = None,
        last_turn_only: bool = False,
        on_error: str = "raise",
        task_field: str = "task",
        glob: Optional[str] = None,
        min_prompt_tokens: int = 8,
        enable_thinking: Optional[bool] = None,
        chat_template_kwargs: Optional[Mapping[str, Any]] = None,
    ):
        check_on_error(on_error)
        if fmt is not None and fmt not in FORMATS:
            raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
        self.report = InputReport()
        self.samples: List[Tuple[np.ndarray, np.ndarray]] = []
        self.formats: Dict[str, str] = {}
        for path in find_files(paths, glob):
            file_fmt = fmt
            for lineno, record in iter_jsonl(path, self.report, on_error):
                where = f"{path}:{lineno}"
                try:
                    if file_fmt is None:
                        file_fmt = detect_format(record, where)
                        self.formats[str(path)] = file_fmt
                    prompt = system.get(record.get(task_field), system.get(None)) if isinstance(system, Mapping) else system
                    enc = encode_chat_detailed(record, tokenizer, max_len=max_len, fmt=file_fmt, system=prompt,
                                               last_turn_only=last_turn_only, min_prompt_tokens=min_prompt_tokens, where=where,
                                               enable_thinking=enable_thinking,
                                               chat_template_kwargs=chat_template_kwargs)
                except DataError as err:
                    self.report.handle(err, on_error)
                    continue
                if enc.history_turns_dropped:
                    self.report.truncated["history-dropped"] += 1
                if enc.prompt_tokens_cut:
                    self.report.truncated["prompt-cut"] += 1
                self.report.kept += 1
                self.samples.append((np.asarray(enc.input_ids, dtype=np.int64), np.asarray(enc.labels, dtype=np.int64)))
        if not self.samples:
            raise DataError(f"{paths}: no usable SFT samples ({self.report.summary()})", "empty")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        ids, labels = self.samples[i]
        return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}

    def lengths(self) -> np.ndarray:
        return np.asarray([len(s[0]) for s in self.samples], dtype=np.int64)

    def split(self, val_fraction: float = 0.0, seed: int = 0) -> Tuple["Subset", "Subset"]:
        """(train, validation) subsets by a seeded permutation of the samples."""
        n = len(self)
        n_val = 0 if val_fraction == 0 or n < 2 else min(n - 1, max(1, int(round(val_fraction * n))))
        perm = np.random.default_rng(seed).permutation(n)
        return Subset(self, np.sort(perm[n_val:])), Subset(self, np.sort(perm[:n_val]))


class Subset(torch.utils.data.Dataset):
    """Items `indices` of a dataset that has lengths() (keeps lengths() for batching/mixing)."""

    def __init__(self, dataset, indices):
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.dataset[int(self.indices[i])]

    def lengths(self) -> np.ndarray:
        return self.dataset.lengths()[self.indices]
