"""Instruction SFT data: alpaca / messages / ShareGPT records -> ChatML ids with label masks.

    ids, labels = encode_chat(example, tok, max_len=1024)
    ds = SFTDataset("train.jsonl", tok, max_len=1024)      # all records, encoded, with a report

Labels are -100 everywhere except the content of every assistant turn and its closing
<|im_end|> (option: the last assistant turn only), so the last supervised label of every
sample is <|im_end|> (151645). The conversation is rendered by the tokenizer's ChatML template
and tokenised as one conversation (control tokens as ids; message text as ordinary text, so a
"<|im_end|>" typed in a message stays text).

Formats (detected per file from its first record, or set with fmt=):
  alpaca:   {"instruction", "input" (optional), "output", "system" (optional), "history" (optional [[q, a], ...])}
  messages: {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
  sharegpt: {"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...], "system" (optional)}
A conversation is an optional system message, then user/assistant turns alternating, ending
with an assistant turn.

Truncation to max_len never leaves a sample without supervised tokens: first the oldest
history turns (user+assistant pairs) are dropped, then the last user message is cut (keeping
its beginning, at least `min_prompt_tokens`), and if the sample still does not fit it is an
error ("too-long"), or with on_error="skip" the sample is dropped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from models.qwen import IGNORE_INDEX

from .errors import DataError, InputReport, check_on_error
from .sources import PathLike, find_files, iter_jsonl

FORMATS = ("alpaca", "messages", "sharegpt")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "model": "assistant", "bot": "assistant",
}


def detect_format(example: Mapping[str, Any], where: str = "example") -> str:
    """'messages', 'sharegpt' or 'alpaca' from the record's keys."""
    if not isinstance(example, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(example).__name__}", "not-object")
    if "messages" in example:
        return "messages"
    if "conversations" in example:
        return "sharegpt"
    if "instruction" in example or "output" in example:
        return "alpaca"
    raise DataError(
        f"{where}: cannot tell the format: expected a field 'messages' (messages), 'conversations' (ShareGPT) "
        f"or 'instruction' + 'output' (alpaca); got keys {sorted(example)[:8]}",
        "missing-field",
    )


def _field(example: Mapping[str, Any], key: str, where: str, optional: bool = False, kind=str):
    if key not in example or example[key] is None:
        if optional:
            return None
        raise DataError(f"{where}: missing field {key!r}", "missing-field")
    value = example[key]
    if not isinstance(value, kind):
        raise DataError(f"{where}: field {key!r} must be a {kind.__name__}, got {type(value).__name__}", "bad-field")
    return value


def to_messages(example: Mapping[str, Any], fmt: Optional[str] = None, where: str = "example") -> List[Dict[str, str]]:
    """A record in any supported format -> [{"role", "content"}, ...] (validated, see check_roles)."""
    fmt = fmt or detect_format(example, where)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    if not isinstance(example, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(example).__name__}", "not-object")
    messages: List[Dict[str, str]] = []
    if fmt == "alpaca":
        instruction = _field(example, "instruction", where)
        output = _field(example, "output", where)
        extra = _field(example, "input", where, optional=True)
        system = _field(example, "system", where, optional=True)
        history = _field(example, "history", where, optional=True, kind=list) or []
        if system:
            messages.append({"role": "system", "content": system})
        for i, pair in enumerate(history):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise DataError(f"{where}: history[{i}] must be a [question, answer] pair of strings", "bad-field")
            messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        prompt = instruction + ("\n\n" + extra if extra else "")
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    elif fmt == "messages":
        items = _field(example, "messages", where, kind=list)
        for i, m in enumerate(items):
            if not isinstance(m, Mapping):
                raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content'", "bad-field")
            role = _field(m, "role", f"{where}: messages[{i}]")
            content = _field(m, "content", f"{where}: messages[{i}]")
            messages.append({"role": role, "content": content})
    else:
        items = _field(example, "conversations", where, kind=list)
        system = _field(example, "system", where, optional=True)
        if system:
            messages.append({"role": "system", "content": system})
        for i, m in enumerate(items):
            if not isinstance(m, Mapping):
                raise DataError(f"{where}: conversations[{i}] must be an object with 'from' and 'value'", "bad-field")
            who = _field(m, "from", f"{where}: conversations[{i}]")
            if who not in SHAREGPT_ROLES:
                raise DataError(f"{where}: conversations[{i}]['from'] = {who!r}; expected one of {sorted(SHAREGPT_ROLES)}", "bad-roles")
            messages.append({"role": SHAREGPT_ROLES[who], "content": _field(m, "value", f"{where}: conversations[{i}]")})
    check_roles(messages, where)
    return messages


def check_roles(messages: Sequence[Mapping[str, str]], where: str = "example") -> None:
    """Optional system first, then user/assistant alternating, starting with user, ending with assistant."""
    if not messages:
        raise DataError(f"{where}: empty conversation", "bad-roles")
    roles = [m["role"] for m in messages]
    start = 1 if roles[0] == "system" else 0
    turns = roles[start:]
    for i, role in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise DataError(
                f"{where}: message {start + i} has role {role!r}, expected {expected!r} "
                f"(roles {roles}: an optional system message, then user/assistant alternating)",
                "bad-roles",
            )
    if not turns or turns[-1] != "assistant":
        raise DataError(f"{where}: the conversation must end with an assistant turn (roles {roles})", "bad-roles")


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


def _encode(messages, tok, system, last_turn_only) -> Tuple[List[int], List[int]]:
    ids, mask = tok.apply_chat_template(messages, tokenize=True, return_assistant_mask=True, system_prompt=system)
    if last_turn_only:
        # Segment-wise encoding makes the ids of all but the last message an exact prefix.
        prefix = len(tok.apply_chat_template(messages[:-1], tokenize=True, system_prompt=system))
        mask = [0] * prefix + list(mask[prefix:])
    return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]


def encode_chat_detailed(
    example: Union[Mapping[str, Any], Sequence[Mapping[str, str]]],
    tokenizer,
    max_len: Optional[int] = None,
    fmt: Optional[str] = None,
    system: Optional[str] = None,
    last_turn_only: bool = False,
    min_prompt_tokens: int = 8,
    where: str = "example",
) -> EncodedChat:
    """encode_chat, also saying how much was truncated (see the module docstring)."""
    if isinstance(example, (list, tuple)):
        messages = [dict(m) for m in example]
        check_roles(messages, where)
    else:
        messages = to_messages(example, fmt, where)
    ids, labels = _encode(messages, tokenizer, system, last_turn_only)
    out = EncodedChat(ids, labels)
    if max_len is None or len(ids) <= max_len:
        return out
    full_len = len(ids)
    # 1. drop the oldest user+assistant pairs, keeping the system message and the last pair
    first = 1 if messages[0]["role"] == "system" else 0
    while len(messages) - first > 2 and len(ids) > max_len:
        messages = messages[:first] + messages[first + 2 :]
        out.history_turns_dropped += 1
        ids, labels = _encode(messages, tokenizer, system, last_turn_only)
    # 2. cut the end of the last user message, keeping at least min_prompt_tokens of it
    if len(ids) > max_len:
        user = messages[-2]
        content_ids = tokenizer.encode(user["content"])
        keep = len(content_ids) - (len(ids) - max_len)
        while keep >= min_prompt_tokens and len(ids) > max_len:
            cut = tokenizer.decode(content_ids[:keep], errors="ignore")  # never half a character
            trial = messages[:-2] + [{"role": "user", "content": cut}, messages[-1]]
            ids, labels = _encode(trial, tokenizer, system, last_turn_only)
            out.prompt_tokens_cut = len(content_ids) - keep
            keep -= max(1, len(ids) - max_len)
    # 3. give up: the caller raises or skips and counts it
    if len(ids) > max_len:
        raise DataError(
            f"{where}: sample is {full_len} tokens, more than max_len={max_len} even after dropping history and "
            f"cutting the prompt to {min_prompt_tokens} tokens (the answer alone does not fit)",
            "too-long",
        )
    out.input_ids, out.labels = ids, labels
    return out


def encode_chat(
    example: Union[Mapping[str, Any], Sequence[Mapping[str, str]]],
    tokenizer,
    max_len: Optional[int] = None,
    **kwargs: Any,
) -> Tuple[List[int], List[int]]:
    """A record (alpaca / messages / ShareGPT dict, or a list of messages) -> (input_ids, labels).

    Labels are -100 off the assistant turns; see the module docstring for truncation. Keyword
    options: fmt, system (default system prompt for records without one), last_turn_only,
    min_prompt_tokens, where (location used in errors).
    """
    enc = encode_chat_detailed(example, tokenizer, max_len=max_len, **kwargs)
    return enc.input_ids, enc.labels


class SFTDataset(torch.utils.data.Dataset):
    """Encoded SFT samples from .jsonl/.json files; items {"input_ids", "labels"}: LongTensors [L].

    system: default system prompt for records without one: a string, or a mapping from the
        record's `task_field` value to a prompt (per-task system prompts; key None = others).
        None: the tokenizer's template default.
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
                                               last_turn_only=last_turn_only, min_prompt_tokens=min_prompt_tokens, where=where)
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
