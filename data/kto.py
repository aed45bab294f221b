"""Unpaired preference data (KTO): one prompt and one completion labelled desirable or not.

    ds = KTODataset("feedback.jsonl", tok, max_len=1024)      # encoded rows, with a report
    train, val = ds.split(val_fraction=0.05, seed=0)
    batch = kto_collate([train[i] for i in range(8)])         # rows + their mismatched KL rows
    rows = unpair(pairs)                                      # TRL's unpair_preference_dataset

Record formats (recognised per record from its keys):
  TRL unpaired: {"prompt": str | [messages], "completion": str | [message], "label": true | false}
      ("messages" is accepted in place of "prompt": the prompt's messages)
  LLaMA-Factory kto (`stage: kto`, `kto_tag` column): {"messages" | "conversations": [... the last an
      assistant message], "label" | "kto_tag": true | false}: the last message is the completion
  paired preference data (any format data/preference.py reads: TRL, LLaMA-Factory ranking): unpaired
      as TRL's KTOTrainer does (trl.data_utils.unpair_preference_dataset): the chosen response is a
      desirable row, the rejected one an undesirable row, both with the pair's prompt
The label must be a JSON boolean (as TRL's `label` column); anything else is a DataError naming
file:line. Messages, tools and "chat_template_kwargs" are read as in data/preference.py.

Encoding: prompt + completion is rendered by the tokenizer's own chat template, and only the
completion is scored (its content and closing <|im_end|>), as data.encode_pair scores a response
(encode_completion: encode_pair with the completion on both sides, so truncation follows the same rules: the
prompt is cut from the left, not below max_prompt_len, then the completion keeps its start; a
row left with no scored token is an error, or dropped and counted with on_error="skip").

KL rows (kto_collate): TRL estimates KTO's KL baseline z from mismatched pairs, built by rotating
the completions by one within each batch: (x_1, y_1), ..., (x_n, y_n) -> (x_1, y_n), (x_2, y_1), ...,
(x_n, y_{n-1}) (TRL 1.16 KTOTrainer._prepare_dataset, over fixed chunks of
per_device_train_batch_size, which is why it requires sequential sampling). Here the rotation is
done by the collate function on the micro-batch actually drawn, so the mismatched completions of a
batch are exactly its own completions (TRL's stated aim) whatever the sampling order. A KL row is
cut to max_len tokens keeping its start (TRL's collator's truncation).
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .collate import ENDOFTEXT_ID, pad_collate
from .conversations import parse_tools, template_kwargs_of
from .errors import DataError, InputReport, check_on_error
from .preference import EncodedPair, Message, _first_scored, _messages, _render, _response, encode_pair, to_preference
from .sft import IGNORE_INDEX, Subset, check_roles, run_template_kwargs, to_messages
from .sources import PathLike, find_files, iter_jsonl

KTO_FORMATS = ("trl", "llama-factory", "paired")
KL_FIELDS = ("kl_input_ids", "kl_labels", "kl_attention_mask")


def _label(record: Mapping[str, Any], key: str, where: str) -> bool:
    value = record[key]
    if not isinstance(value, bool):
        raise DataError(f"{where}: field {key!r} must be true or false (a JSON boolean: desirable or not), got "
                        f"{value!r}"[:300], "bad-label")
    return value


def detect_kto_format(record: Mapping[str, Any], where: str = "record") -> str:
    """'trl' (prompt + completion + label), 'llama-factory' (messages + label / kto_tag) or 'paired'."""
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}", "not-object")
    if "chosen" in record or "rejected" in record:
        return "paired"
    if "completion" in record:
        if "label" not in record:
            raise DataError(f"{where}: missing field 'label': an unpaired row needs 'prompt', 'completion' and "
                            "'label' (true: desirable, false: undesirable)", "missing-label")
        return "trl"
    if "messages" in record or "conversations" in record:
        if "label" not in record and "kto_tag" not in record:
            raise DataError(f"{where}: missing field 'label' (or LLaMA-Factory's 'kto_tag'): true for a desirable "
                            "last answer, false for an undesirable one", "missing-label")
        return "llama-factory"
    raise DataError(f"{where}: not an unpaired row: expected 'prompt' + 'completion' + 'label', 'messages' + 'label', "
                    f"or a preference pair ('chosen' + 'rejected'); got keys {sorted(record)[:8]}", "missing-field")


def to_unpaired(record: Mapping[str, Any], where: str = "record") -> List[Tuple[List[Message], Message, bool]]:
    """A record -> [(prompt messages, completion message, desirable)]: one row, or two for a pair."""
    fmt = detect_kto_format(record, where)
    if fmt == "paired":
        prompt, chosen, rejected = to_preference(record, where=where)
        return [(prompt, chosen, True), (prompt, rejected, False)]
    if fmt == "trl":
        label = _label(record, "label", where)
        key = "prompt" if "prompt" in record else "messages" if "messages" in record else None
        if key is None:
            raise DataError(f"{where}: missing field 'prompt' (a string or a list of messages)", "missing-field")
        value = record[key]
        prompt = [{"role": "user", "content": value}] if isinstance(value, str) else _messages(value, f"{where}: field {key!r}")
        completion = _response(record["completion"], f"{where}: field 'completion'")
    else:
        label = _label(record, "label" if "label" in record else "kto_tag", where)
        if "conversations" in record:
            messages = to_messages({"conversations": record["conversations"], "system": record.get("system")},
                                   "sharegpt", where)
        else:
            messages = _messages(record["messages"], f"{where}: field 'messages'")
        if not messages or messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's answer the label is about", "bad-roles")
        prompt, completion = messages[:-1], messages[-1]
    system = record.get("system") if fmt == "trl" else None
    if system is not None:
        if not isinstance(system, str):
            raise DataError(f"{where}: field 'system' must be a string, got {type(system).__name__}", "bad-field")
        if prompt and prompt[0]["role"] == "system":
            raise DataError(f"{where}: two system prompts: field 'system' and a system message", "bad-roles")
        prompt = [{"role": "system", "content": system}] + prompt
    check_roles(prompt + [completion], where)
    return [(prompt, completion, label)]


def unpair(pairs: Iterable[Mapping[str, Any]]) -> List[dict]:
    """Preference pairs {"prompt", "chosen", "rejected", ...} -> unpaired rows {"prompt", "completion",
    "label", ...} (TRL's unpair_preference_dataset; here each pair's two rows are adjacent)."""
    rows = []
    for pair in pairs:
        extra = {k: v for k, v in pair.items() if k not in ("prompt", "chosen", "rejected")}
        for key, label in (("chosen", True), ("rejected", False)):
            rows.append({"prompt": pair["prompt"], "completion": pair[key], "label": label, **extra}
                        if "prompt" in pair else {"completion": pair[key], "label": label, **extra})
    return rows


def encode_completion(prompt: List[Message], completion: Message, tokenizer, max_len: Optional[int] = None,
                      **kwargs: Any) -> EncodedPair:
    """One row as data.encode_pair encodes a pair whose two responses are this completion (its
    chosen_* fields); rendered once when it fits in max_len. kwargs: encode_pair's."""
    check_roles(prompt + [completion], kwargs.get("where", "record"))
    options = dict(kwargs.get("chat_template_kwargs") or {}, tools=kwargs.get("tools"))
    ids, labels = _render(prompt, completion, tokenizer, kwargs.get("system"), kwargs.get("where", "record"), options)
    if max_len is None or len(ids) <= max_len:
        start = _first_scored(labels)
        return EncodedPair(ids[:start], ids[start:], labels[start:], ids[start:], labels[start:])
    return encode_pair(prompt, completion, completion, tokenizer, max_len=max_len, **kwargs)


class KTODataset(torch.utils.data.Dataset):
    """Encoded unpaired rows from .jsonl / .json files (see the module docstring).

    Items: {"input_ids", "labels"} LongTensors [L] (prompt + completion, labels -100 off the
    completion), "prompt_length" (tokens before the completion) and "label" (bool tensor).
    `report` holds the counts; desirable / undesirable: rows of each label.
    """

    def __init__(self, paths: Union[PathLike, Sequence[PathLike]], tokenizer, max_len: Optional[int] = 1024,
                 max_prompt_len: Optional[int] = None, system: Optional[str] = None, on_error: str = "raise",
                 glob: Optional[str] = None, min_prompt_tokens: int = 8,
                 chat_template_kwargs: Optional[Mapping[str, Any]] = None):
        check_on_error(on_error)
        if max_len is not None and max_len < 2:
            raise ValueError(f"max_len must be at least 2, got {max_len}")
        if max_prompt_len is not None and max_len is not None and not 0 <= max_prompt_len < max_len:
            raise ValueError(f"max_prompt_len must be in [0, max_len={max_len}), got {max_prompt_len}")
        self.max_len = max_len
        self.report = InputReport()
        self.rows: List[Tuple[np.ndarray, np.ndarray, np.ndarray, bool]] = []
        for path in find_files(paths, glob):
            for lineno, record in iter_jsonl(path, self.report, on_error):
                where = f"{path}:{lineno}"
                try:
                    rows = to_unpaired(record, where)
                    kwargs = run_template_kwargs(chat_template_kwargs) | template_kwargs_of(record, where)
                    tools = parse_tools(record.get("tools"), where)
                    encoded = [(encode_completion(prompt, completion, tokenizer, max_len=max_len,
                                                  max_prompt_len=max_prompt_len, system=system,
                                                  min_prompt_tokens=min_prompt_tokens, where=where,
                                                  chat_template_kwargs=kwargs, tools=tools), label)
                               for prompt, completion, label in rows]
                except DataError as err:
                    self.report.handle(err, on_error)
                    continue
                for enc, label in encoded:
                    for kind, n in (("history-dropped", enc.history_turns_dropped),
                                    ("prompt-cut", enc.prompt_tokens_cut), ("response-cut", enc.response_tokens_cut)):
                        if n:
                            self.report.truncated[kind] += 1
                    self.rows.append((np.asarray(enc.prompt_ids, dtype=np.int64), np.asarray(enc.chosen_ids, dtype=np.int64),
                                      np.asarray(enc.chosen_labels, dtype=np.int64), bool(label)))
                self.report.kept += 1
        if not self.rows:
            raise DataError(f"{paths}: no usable unpaired rows ({self.report.summary()})", "empty")

    @property
    def desirable(self) -> int:
        return sum(r[3] for r in self.rows)

    @property
    def undesirable(self) -> int:
        return len(self.rows) - self.desirable

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        prompt, ids, labels, label = self.rows[i]
        return {"input_ids": torch.from_numpy(np.concatenate([prompt, ids])),
                "labels": torch.from_numpy(np.concatenate([np.full(len(prompt), IGNORE_INDEX, dtype=np.int64), labels])),
                "prompt_length": torch.tensor(len(prompt)), "label": torch.tensor(label)}

    def lengths(self) -> np.ndarray:
        return np.asarray([len(r[0]) + len(r[1]) for r in self.rows], dtype=np.int64)

    def split(self, val_fraction: float = 0.0, seed: int = 0) -> Tuple[Subset, Subset]:
        """(train, validation) subsets by a seeded permutation (the rule of data.SFTDataset.split)."""
        n = len(self)
        n_val = 0 if val_fraction == 0 or n < 2 else min(n - 1, max(1, int(round(val_fraction * n))))
        perm = np.random.default_rng(seed).permutation(n)
        return Subset(self, np.sort(perm[n_val:])), Subset(self, np.sort(perm[:n_val]))


def kto_collate(items: Sequence[Mapping[str, torch.Tensor]], pad_id: int = ENDOFTEXT_ID,
                max_len: Optional[int] = None, pad_to_multiple_of: Optional[int] = None,
                kl_stride: int = 1) -> Dict[str, torch.Tensor]:
    """B rows -> a batch: input_ids / labels / attention_mask [B, T] (right-padded: pad_id, -100, 0),
    label bool [B], and the KL rows kl_input_ids / kl_labels / kl_attention_mask [B, T']: row i's
    prompt with row (i - 1) mod B's completion, cut to max_len tokens (see the module docstring).

    kl_stride W: the rows are the interleaved shares of W processes (train.MicroBatchSampler gives
    rank r the positions r, r + W, ... of a global micro-batch), and each share is rotated on its
    own, as each of W processes rotates its micro-batch: row i takes the completion of row
    (i - W) mod B within its share. One process with W x b rows and kl_stride=W forms exactly the
    KL rows of W processes with b rows each (tests/train/test_kto_distributed.py).
    """
    if not items:
        raise ValueError("kto_collate: empty batch")
    if kl_stride < 1 or len(items) % kl_stride:
        raise ValueError(f"kto_collate: kl_stride {kl_stride} must be a positive divisor of the batch's {len(items)} rows")
    rows = [{"input_ids": it["input_ids"], "labels": it["labels"]} for it in items]
    batch = pad_collate(rows, pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of)
    if "attention_mask" not in batch:
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    batch["label"] = torch.stack([torch.as_tensor(it["label"], dtype=torch.bool).reshape(()) for it in items])
    kl_rows = []
    for i, it in enumerate(items):
        other = items[(i - kl_stride) % len(items)]
        p, q = int(it["prompt_length"]), int(other["prompt_length"])
        ids = torch.cat([it["input_ids"][:p], other["input_ids"][q:]])
        labels = torch.cat([torch.full((p,), IGNORE_INDEX, dtype=torch.long), other["labels"][q:]])
        if max_len is not None:
            ids, labels = ids[:max_len], labels[:max_len]
        kl_rows.append({"input_ids": ids, "labels": labels})
    kl = pad_collate(kl_rows, pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of)
    batch["kl_input_ids"], batch["kl_labels"] = kl["input_ids"], kl["labels"]
    batch["kl_attention_mask"] = kl.get("attention_mask", torch.ones_like(kl["input_ids"]))
    return batch
