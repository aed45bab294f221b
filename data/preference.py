"""Preference pairs (DPO, IPO, SimPO, ORPO): a shared prompt and two responses, only responses scored.

    ds = PreferenceDataset("pairs.jsonl", tok, max_len=1024)   # encoded pairs, with a report
    train, val = ds.split(val_fraction=0.05, seed=0)
    batch = preference_collate([train[i] for i in range(4)])   # rows: 4 chosen, then 4 rejected
    pairs = pairs_from_sft(sft_records, seed=0)                # demo pairs from SFT conversations

Record formats (recognised per record from its keys):
  TRL, explicit prompt: {"prompt": str | [messages], "chosen": str | [message], "rejected": str | [message]}
      ("messages" is accepted in place of "prompt": the prompt's messages)
  TRL, implicit prompt: {"chosen": [messages], "rejected": [messages]}: two whole conversations that
      share every message but the last, an assistant message each
  LLaMA-Factory sharegpt ranking: {"conversations": [{"from", "value"}, ...], "chosen": {"from": "gpt",
      "value"}, "rejected": {...}, "system" (optional)}
  LLaMA-Factory alpaca ranking: {"instruction", "input" (optional), "chosen": str, "rejected": str,
      "system" (optional), "history" (optional [[question, answer], ...])}
Message content is a string or a list of text parts ({"type": "text", "text": ...}); an image or
video part is an error naming the file, line and part (data/conversations.py). A record's
"chat_template_kwargs" (a JSON object) override the run's template variables for that pair.
A response is a string, one assistant message ({"role", "content"} or {"from", "value"}) or a list of
one such message (OpenAI-style messages keep their tool_calls, reasoning_content and tool
results, and a record's "tools" are offered as in SFT); a string prompt is one user message. The prompt is an optional system message,
then user/assistant turns ending with a user turn (a multi-turn prompt keeps its earlier answers).

Encoding: prompt + response is rendered by the tokenizer's own chat template
(`apply_chat_template(..., tokenize=True, return_assistant_mask=True)`), once with the chosen and
once with the rejected response. Labels are -100 everywhere except the final assistant turn as the
template marks it (its content and closing <|im_end|>), exactly the tokens SFT supervises; earlier
answers in the prompt are context only. Both renderings must agree on every token before the
response: that is the shared prompt. Tokens after the last scored one are dropped (they score
nothing and condition nothing).

Truncation to max_len tokens per row (prompt + the longer response):
  1. the prompt is cut from the left (the last turns are kept), but not below max_prompt_len
     tokens (default max_len // 2): first whole user+assistant turns after the system message are
     dropped, oldest first, then the start of the last user message is cut (at least
     min_prompt_tokens of it stay);
  2. both responses are cut to the same budget, max_len - prompt tokens, keeping their start;
  3. a pair left with a response of zero scored tokens is an error ("too-long"), or with
     on_error="skip" is dropped and counted.
Every problem is a data.DataError naming file:line and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .collate import ENDOFTEXT_ID, pad_collate
from .errors import DataError, InputReport, check_on_error
from .conversations import parse_content, parse_message, parse_tools, template_kwargs_of
from .sft import IGNORE_INDEX, SHAREGPT_ROLES, Subset, check_roles, run_template_kwargs, to_messages, with_text
from .sources import PathLike, find_files, iter_jsonl

PREFERENCE_FORMATS = ("trl", "trl-implicit", "sharegpt", "alpaca")
REFERENCE_FIELDS = ("ref_chosen_logps", "ref_rejected_logps")

Message = Dict[str, Any]


# ---------------------------------------------------------------------- records -> messages
def detect_preference_format(record: Mapping[str, Any], where: str = "record") -> str:
    """'trl', 'trl-implicit', 'sharegpt' or 'alpaca' from the record's keys."""
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}", "not-object")
    for key in ("chosen", "rejected"):
        if key not in record:
            raise DataError(f"{where}: missing field {key!r}: a preference pair needs 'chosen' and 'rejected' "
                            f"(got keys {sorted(record)[:8]})", "missing-field")
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record:
        return "alpaca"
    if "prompt" in record or "messages" in record:
        return "trl"
    return "trl-implicit"


def _message(value: Any, where: str) -> Message:
    """{"role", "content"} from {"role", "content"} or ShareGPT's {"from", "value"}."""
    if not isinstance(value, Mapping):
        raise DataError(f"{where}: expected a message object with 'role' and 'content', got {type(value).__name__}",
                        "bad-field")
    if "role" in value:  # OpenAI style: tool_calls, reasoning_content and tool results kept
        return parse_message(value, where)
    if "from" in value:
        role, content = SHAREGPT_ROLES.get(value["from"], value["from"]), value.get("value")
    else:
        raise DataError(f"{where}: a message needs 'role' and 'content' (or 'from' and 'value'), got keys "
                        f"{sorted(value)[:6]}", "missing-field")
    if not isinstance(content, (str, list)):
        raise DataError(f"{where}: message content must be a string or a list of text parts, got "
                        f"{type(content).__name__}", "bad-field")
    return {"role": role, "content": parse_content(content, where)}


def _messages(value: Any, where: str) -> List[Message]:
    if not isinstance(value, list):
        raise DataError(f"{where}: expected a list of messages, got {type(value).__name__}", "bad-field")
    return [_message(m, f"{where}[{i}]") for i, m in enumerate(value)]


def _response(value: Any, where: str) -> Message:
    """A response: a string, one assistant message, or a list holding one assistant message."""
    if isinstance(value, str):
        return {"role": "assistant", "content": value}
    if isinstance(value, list):
        if len(value) != 1:
            raise DataError(f"{where}: expected one assistant message, got a list of {len(value)} messages "
                            "(a multi-turn prompt belongs in 'prompt')", "bad-field")
        where, value = f"{where}[0]", value[0]
    message = _message(value, where)
    if message["role"] != "assistant":
        raise DataError(f"{where}: the response must be an assistant message, got role {message['role']!r}",
                        "bad-roles")
    return message


def _implicit_prompt(chosen: List[Message], rejected: List[Message], where: str):
    """TRL's implicit prompt: the messages both conversations share; one differing answer each."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == len(chosen) == len(rejected):
        raise DataError(f"{where}: 'chosen' and 'rejected' are the same conversation", "bad-field")
    if not (shared == len(chosen) - 1 == len(rejected) - 1):
        raise DataError(f"{where}: 'chosen' and 'rejected' must be the same conversation up to a last assistant "
                        f"message each; they differ from message {shared} on ({len(chosen)} vs {len(rejected)} "
                        "messages)", "bad-field")
    return chosen[:shared], chosen[-1], rejected[-1]


def to_preference(record: Mapping[str, Any], fmt: Optional[str] = None,
                  where: str = "record") -> Tuple[List[Message], Message, Message]:
    """A record in any supported format -> (prompt messages, chosen message, rejected message).

    The prompt is validated with the response after it (data.check_roles): an optional system
    message, user/assistant alternating, ending with a user message.
    """
    fmt = fmt or detect_preference_format(record, where)
    if fmt not in PREFERENCE_FORMATS:
        raise ValueError(f"unknown preference format {fmt!r}; expected one of {PREFERENCE_FORMATS}")
    chosen = _response(record["chosen"], f"{where}: field 'chosen'") if fmt != "trl-implicit" else None
    rejected = _response(record["rejected"], f"{where}: field 'rejected'") if fmt != "trl-implicit" else None
    if fmt == "sharegpt":
        conversations = record["conversations"]
        if not isinstance(conversations, list):
            raise DataError(f"{where}: field 'conversations' must be a list, got {type(conversations).__name__}",
                            "bad-field")
        # to_messages validates the turns and places the optional "system" field.
        full = {"conversations": conversations + [{"from": "gpt", "value": chosen["content"]}],
                "system": record.get("system")}
        prompt = to_messages(full, "sharegpt", where)[:-1]
    elif fmt == "alpaca":
        base = {k: record[k] for k in ("instruction", "input", "system", "history") if k in record}
        prompt = to_messages(dict(base, output=chosen["content"]), "alpaca", where)[:-1]
    elif fmt == "trl":
        key = "prompt" if "prompt" in record else "messages"
        value = record[key]
        if isinstance(value, str):
            prompt = [{"role": "user", "content": value}]
        else:
            prompt = _messages(value, f"{where}: field {key!r}")
        system = record.get("system")
        if system is not None:
            if not isinstance(system, str):
                raise DataError(f"{where}: field 'system' must be a string, got {type(system).__name__}", "bad-field")
            if prompt and prompt[0]["role"] == "system":
                raise DataError(f"{where}: two system prompts: field 'system' and a system message in {key!r}",
                                "bad-roles")
            prompt = [{"role": "system", "content": system}] + prompt
    else:
        for key in ("chosen", "rejected"):
            if isinstance(record[key], str):
                raise DataError(f"{where}: no 'prompt' field, and {key!r} is a string: give a 'prompt', or give "
                                "'chosen' and 'rejected' as whole conversations (lists of messages)", "missing-field")
        prompt, chosen, rejected = _implicit_prompt(_messages(record["chosen"], f"{where}: field 'chosen'"),
                                                    _messages(record["rejected"], f"{where}: field 'rejected'"), where)
        if chosen["role"] != "assistant" or rejected["role"] != "assistant":
            raise DataError(f"{where}: the last messages of 'chosen' and 'rejected' must be assistant messages "
                            f"(got {chosen['role']!r}, {rejected['role']!r})", "bad-roles")
    check_roles(prompt + [chosen], where)
    return prompt, chosen, rejected


# ---------------------------------------------------------------------- encoding
@dataclass
class EncodedPair:
    """Token lists of one pair: rows are prompt_ids + chosen_ids and prompt_ids + rejected_ids.

    chosen_labels / rejected_labels align with chosen_ids / rejected_ids: the token where it is
    scored, -100 elsewhere (the prompt is never scored).
    """

    prompt_ids: List[int]
    chosen_ids: List[int]
    chosen_labels: List[int]
    rejected_ids: List[int]
    rejected_labels: List[int]
    history_turns_dropped: int = 0
    prompt_tokens_cut: int = 0
    response_tokens_cut: int = 0  # the larger cut of the two responses

    @property
    def row_length(self) -> int:
        """Tokens of the longer row (prompt + response)."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


def _render(prompt: List[Message], response: Message, tokenizer, system: Optional[str], where: str,
            options: Mapping[str, Any], keep_tail: bool = False):
    """(ids, labels) of prompt + response, labels on the final assistant turn only, cut after it
    (keep_tail: not cut; what the template renders after the turn stays, unlabelled).
    system: the default system prompt, for a prompt that has none; options: tools and template variables."""
    if system is not None and (not prompt or prompt[0]["role"] != "system"):
        prompt = [{"role": "system", "content": system}] + list(prompt)
    ids, mask = tokenizer.apply_chat_template(prompt + [response], tokenize=True, return_assistant_mask=True,
                                              **options)
    end = len(mask)
    while end > 0 and not mask[end - 1]:
        end -= 1
    if end == 0:
        raise DataError(f"{where}: the chat template marked no assistant token in the response", "bad-template")
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    labels = [IGNORE_INDEX] * start + list(ids[start:end])
    if keep_tail:
        return list(ids), labels + [IGNORE_INDEX] * (len(ids) - end)
    return list(ids[:end]), labels


def _first_scored(labels: Sequence[int]) -> int:
    return next(i for i, t in enumerate(labels) if t != IGNORE_INDEX)


def _encode_untruncated(prompt, chosen, rejected, tokenizer, system, where, options, keep_tail=False) -> EncodedPair:
    c_ids, c_labels = _render(prompt, chosen, tokenizer, system, where, options, keep_tail)
    r_ids, r_labels = _render(prompt, rejected, tokenizer, system, where, options, keep_tail)
    # The shared prompt ends where the first response starts (a response starting with "\n"
    # may merge with the header's "\n" into one scored token, so take the earlier start).
    start = min(_first_scored(c_labels), _first_scored(r_labels))
    if c_ids[:start] != r_ids[:start]:
        raise DataError(f"{where}: the chat template renders the prompt differently before the chosen and before "
                        "the rejected response, so the pair has no shared prompt", "bad-template")
    return EncodedPair(c_ids[:start], c_ids[start:], c_labels[start:], r_ids[start:], r_labels[start:])


def encode_pair(
    prompt: List[Message],
    chosen: Message,
    rejected: Message,
    tokenizer,
    max_len: Optional[int] = None,
    max_prompt_len: Optional[int] = None,
    system: Optional[str] = None,
    min_prompt_tokens: int = 8,
    where: str = "record",
    chat_template_kwargs: Optional[Mapping[str, Any]] = None,
    tools: Optional[List[Dict[str, Any]]] = None,
    keep_tail: bool = False,
) -> EncodedPair:
    """Encode one pair (see the module docstring for labels and truncation).

    system: default system prompt for a prompt without one (None: the template's default).
    chat_template_kwargs: template variables (enable_thinking, preserve_thinking, ...); tools: the
    JSON schemas offered to the model (OpenAI style), as in SFT.
    max_prompt_len: the prompt is not cut below this many tokens (default max_len // 2).
    keep_tail: keep what the template renders after the response (unlabelled): the whole rendered
    conversation, as TRL's RewardTrainer tokenizes it (a reward model scores its last token).
    """
    check_roles(prompt + [chosen], where)
    check_roles(prompt + [rejected], where)
    kw = dict(chat_template_kwargs or {}, tools=tools)
    enc = _encode_untruncated(prompt, chosen, rejected, tokenizer, system, where, kw, keep_tail)
    if max_len is None or enc.row_length <= max_len:
        return enc
    full_length = enc.row_length
    floor = max_len // 2 if max_prompt_len is None else max_prompt_len
    longest = max(len(enc.chosen_ids), len(enc.rejected_ids))
    target = max(max_len - longest, floor)
    dropped = cut = 0
    # 1a. drop the oldest user+assistant turns (after the system message), keeping the last question
    first = 1 if prompt[0]["role"] == "system" else 0
    while len(enc.prompt_ids) > target and len(prompt) - first > 1:
        prompt = prompt[:first] + prompt[first + 2:]
        dropped += 1
        enc = _encode_untruncated(prompt, chosen, rejected, tokenizer, system, where, kw, keep_tail)
    # 1b. cut the start of the last user message, keeping at least min_prompt_tokens of it
    if len(enc.prompt_ids) > target:
        content = prompt[-1]["content"]
        part = 0 if isinstance(content, list) else None  # parts: cut the first one
        content_ids = tokenizer.encode(content if part is None else content[0]["text"] if content else "")
        keep = len(content_ids)
        while len(enc.prompt_ids) > target and keep > min_prompt_tokens:
            keep = max(min_prompt_tokens, keep - (len(enc.prompt_ids) - target))
            text = tokenizer.decode(content_ids[len(content_ids) - keep:], errors="ignore")  # never half a character
            trial = prompt[:-1] + [{"role": "user", "content": with_text(content, part, text)}]
            enc = _encode_untruncated(trial, chosen, rejected, tokenizer, system, where, kw, keep_tail)
            cut = len(content_ids) - keep
    # 2. both responses to the same budget, keeping their start
    budget = max(0, max_len - len(enc.prompt_ids))
    response_cut = max(0, max(len(enc.chosen_ids), len(enc.rejected_ids)) - budget)
    for side in ("chosen", "rejected"):
        ids, labels = getattr(enc, f"{side}_ids")[:budget], getattr(enc, f"{side}_labels")[:budget]
        # 3. a response must keep a scored token
        if all(t == IGNORE_INDEX for t in labels):
            raise DataError(
                f"{where}: pair is {full_length} tokens, more than max_len={max_len}; after cutting the prompt to "
                f"{len(enc.prompt_ids)} tokens no token of the {side} response is left to score (raise max_len, "
                f"or lower max_prompt_len={floor})", "too-long")
        setattr(enc, f"{side}_ids", ids)
        setattr(enc, f"{side}_labels", labels)
    enc.history_turns_dropped, enc.prompt_tokens_cut, enc.response_tokens_cut = dropped, cut, response_cut
    return enc


def _margin(record: Mapping[str, Any], where: str) -> Optional[float]:
    """A record's optional "margin" (TRL's RewardTrainer column): a finite number, or None when absent."""
    if not isinstance(record, Mapping) or "margin" not in record:
        return None
    value = record["margin"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise DataError(f"{where}: field 'margin' must be a finite number, got {json.dumps(value)[:40]}", "bad-field")
    return float(value)


# ---------------------------------------------------------------------- dataset
class PreferenceDataset(torch.utils.data.Dataset):
    """Encoded preference pairs from .jsonl / .json files (see the module docstring).

    Items: {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"},
    LongTensors [L] (prompt + response each). `report` holds the counts (read, kept, skipped by
    reason, truncated by kind); on_error="skip" drops and counts bad or over-long pairs.
    chat_template_kwargs: template variables for every pair (a record's own override them).
    """

    def __init__(
        self,
        paths: Union[PathLike, Sequence[PathLike]],
        tokenizer,
        max_len: Optional[int] = 1024,
        max_prompt_len: Optional[int] = None,
        system: Optional[str] = None,
        on_error: str = "raise",
        glob: Optional[str] = None,
        min_prompt_tokens: int = 8,
        chat_template_kwargs: Optional[Mapping[str, Any]] = None,
        keep_tail: bool = False,
    ):
        check_on_error(on_error)
        if max_len is not None and max_len < 2:
            raise ValueError(f"max_len must be at least 2, got {max_len}")
        if max_prompt_len is not None and max_len is not None and not 0 <= max_prompt_len < max_len:
            raise ValueError(f"max_prompt_len must be in [0, max_len={max_len}), got {max_prompt_len}")
        self.report = InputReport()
        self.pairs: List[Tuple[np.ndarray, ...]] = []
        margins: List[Optional[float]] = []
        for path in find_files(paths, glob):
            for lineno, record in iter_jsonl(path, self.report, on_error):
                where = f"{path}:{lineno}"
                try:
                    margin = _margin(record, where)
                    prompt, chosen, rejected = to_preference(record, where=where)
                    kwargs = run_template_kwargs(chat_template_kwargs) | template_kwargs_of(record, where)
                    enc = encode_pair(prompt, chosen, rejected, tokenizer, max_len=max_len, max_prompt_len=max_prompt_len,
                                      system=system, min_prompt_tokens=min_prompt_tokens, where=where,
                                      chat_template_kwargs=kwargs, tools=parse_tools(record.get("tools"), where),
                                      keep_tail=keep_tail)
                except DataError as err:
                    self.report.handle(err, on_error)
                    continue
                for kind, n in (("history-dropped", enc.history_turns_dropped), ("prompt-cut", enc.prompt_tokens_cut),
                                ("response-cut", enc.response_tokens_cut)):
                    if n:
                        self.report.truncated[kind] += 1
                self.report.kept += 1
                margins.append(margin)
                self.pairs.append(tuple(np.asarray(x, dtype=np.int64) for x in (
                    enc.prompt_ids, enc.chosen_ids, enc.chosen_labels, enc.rejected_ids, enc.rejected_labels)))
        if not self.pairs:
            raise DataError(f"{paths}: no usable preference pairs ({self.report.summary()})", "empty")
        # TRL's optional "margin" column: items carry it when any record has one (0 where absent).
        self.margins = (np.asarray([m or 0.0 for m in margins], dtype=np.float32)
                        if any(m is not None for m in margins) else None)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        prompt, c_ids, c_labels, r_ids, r_labels = self.pairs[i]
        unscored = np.full(len(prompt), IGNORE_INDEX, dtype=np.int64)
        item = {
            "chosen_input_ids": torch.from_numpy(np.concatenate([prompt, c_ids])),
            "chosen_labels": torch.from_numpy(np.concatenate([unscored, c_labels])),
            "rejected_input_ids": torch.from_numpy(np.concatenate([prompt, r_ids])),
            "rejected_labels": torch.from_numpy(np.concatenate([unscored, r_labels])),
        }
        if self.margins is not None:
            item["margin"] = torch.tensor(float(self.margins[i]))
        return item

    def lengths(self) -> np.ndarray:
        """Tokens of each pair's longer row."""
        return np.asarray([len(p[0]) + max(len(p[1]), len(p[3])) for p in self.pairs], dtype=np.int64)

    def split(self, val_fraction: float = 0.0, seed: int = 0) -> Tuple[Subset, Subset]:
        """(train, validation) subsets by a seeded permutation (the rule of data.SFTDataset.split)."""
        n = len(self)
        n_val = 0 if val_fraction == 0 or n < 2 else min(n - 1, max(1, int(round(val_fraction * n))))
        perm = np.random.default_rng(seed).permutation(n)
        return Subset(self, np.sort(perm[n_val:])), Subset(self, np.sort(perm[:n_val]))


def preference_collate(
    items: Sequence[Mapping[str, torch.Tensor]],
    pad_id: int = ENDOFTEXT_ID,
    pad_to_multiple_of: Optional[int] = None,
) -> Dict[str, torch.Tensor]:
    """B pairs -> one batch of 2B rows: the B chosen rows, then the B rejected rows.

    input_ids / labels / attention_mask: LongTensors [2B, T], right-padded with `pad_id`, label
    -100 and mask 0. Items carrying precomputed reference log-probs (REFERENCE_FIELDS, scalars)
    add "ref_chosen_logps" / "ref_rejected_logps": float32 [B]; items carrying a "margin" add
    "margin": float32 [B].
    """
    if not items:
        raise ValueError("preference_collate: empty batch")
    rows = [{"input_ids": it[f"{side}_input_ids"], "labels": it[f"{side}_labels"]}
            for side in ("chosen", "rejected") for it in items]
    batch = pad_collate(rows, pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of)
    if "attention_mask" not in batch:
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    carried = [all(key in it for it in items) for key in REFERENCE_FIELDS]
    if any(key in it for it in items for key in REFERENCE_FIELDS) and not all(carried):
        raise ValueError(f"preference_collate: some items carry {REFERENCE_FIELDS} and others do not")
    if all(carried):
        for key in REFERENCE_FIELDS:
            batch[key] = torch.stack([torch.as_tensor(it[key], dtype=torch.float32).reshape(()) for it in items])
    with_margin = ["margin" in it for it in items]
    if any(with_margin) and not all(with_margin):
        raise ValueError("preference_collate: some items carry a margin and others do not")
    if all(with_margin):
        batch["margin"] = torch.stack([torch.as_tensor(it["margin"], dtype=torch.float32).reshape(()) for it in items])
    return batch


# ---------------------------------------------------------------------- demo pairs
def pairs_from_sft(records: Iterable[Union[Mapping[str, Any], Sequence[Message]]], seed: int = 0) -> List[dict]:
    """Preference pairs from SFT conversations: each record's own last answer is chosen, the last
    answer of a different record (one whose answer differs) is rejected.

    records: SFT records (alpaca / messages / ShareGPT dicts) or message lists. The pairing is a
    seeded cyclic shift of a permutation, so it is deterministic by `seed` and every answer is
    rejected about once. Returns TRL-format dicts {"prompt": [messages], "chosen": [message],
    "rejected": [message]}, in the records' order.
    """
    conversations = []
    for i, record in enumerate(records):
        where = f"record {i}"
        if isinstance(record, (list, tuple)):
            messages = [dict(m) for m in record]
            check_roles(messages, where)
        else:
            messages = to_messages(record, where=where)
        conversations.append(messages)
    answers = [c[-1]["content"] for c in conversations]
    keys = [json.dumps(a, sort_keys=True) for a in answers]  # content may be a list of parts
    if len(set(keys)) < 2:
        raise DataError(f"pairs_from_sft: {len(answers)} record(s) with {len(set(keys))} distinct answer(s); "
                        "at least two different answers are needed to make pairs", "empty")
    n = len(conversations)
    order = np.random.default_rng(seed).permutation(n)
    pairs: List[Optional[dict]] = [None] * n
    for k, i in enumerate(order.tolist()):
        shift = 1
        while keys[order[(k + shift) % n]] == keys[i]:  # another record with the same answer: skip it
            shift += 1
        other = int(order[(k + shift) % n])
        pairs[i] = {"prompt": conversations[i][:-1], "chosen": [conversations[i][-1]],
                    "rejected": [{"role": "assistant", "content": answers[other]}]}
    return pairs  # type: ignore[return-value]
