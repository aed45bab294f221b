"""The training and held-out datasets of a stage, built from files (the library side of the
examples' "data" step; usable from Python without the cli).

    import data
    train, held_out, info = data.cpt_datasets(["corpus/"], tok, block_size=2048, eval_fraction=0.05, seed=0)
    train, held_out, info = data.sft_datasets(["chat.jsonl"], tok, max_len=1024, eval_fraction=0.05, seed=0)
    train, held_out, info = data.preference_datasets(["pairs.jsonl"], tok, max_len=1024, eval_path="val.jsonl")
    train, held_out, info = data.kto_datasets(["feedback.jsonl"], tok, max_len=1024, eval_fraction=0.05)
    docs = data.cpt_held_out_documents(["corpus/"], tok, eval_fraction=0.05, seed=0)   # cpt_datasets' held out
    questions = data.held_out_questions("val.jsonl", 3)                               # first user messages

Each *_datasets returns a `StageData` (a named tuple: train, held_out, info). train: a Dataset
whose items are dicts of LongTensors (see data/packing.py, data/sft.py, data/preference.py);
held_out: one of the same kind, or None when nothing is held out; info: one line describing
both. The held-out split is a seeded permutation of whole documents (CPT) or samples (SFT,
pairs), so the same files, fraction and seed give the same split wherever it is built.

Several processes (torchrun): the CPT token cache must be written by one process before the
others read it. `main_process_first` is a context-manager factory that makes rank 0 run the
block first and the others after it (the cli passes `train.distributed.main_process_first`;
data does not import train); the default runs it at once (one process).
"""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, List, Mapping, NamedTuple, Optional, Sequence

import numpy as np

from fileio.safe_load import loads_json

from .cpt import Corpus, Documents, load_corpus
from .errors import DataError
from .kto import KTODataset
from .packing import pack_documents
from .preference import PreferenceDataset
from .sft import SFTDataset
from .sources import PathLike

__all__ = ["StageData", "cpt_datasets", "cpt_held_out_documents", "sft_datasets", "preference_datasets",
           "kto_datasets", "held_out_questions"]


class StageData(NamedTuple):
    """(train, held_out, info) of a stage: held_out is None when nothing is held out."""

    train: Any
    held_out: Optional[Any]
    info: str


def _progress(progress: Optional[bool]) -> bool:
    return sys.stderr.isatty() if progress is None else progress


def _cpt_split(paths: Sequence[PathLike], tokenizer, eval_fraction: float, seed: int, text_field: str,
               main_process_first: Callable[[], ContextManager], progress: Optional[bool],
               cache_dir: Optional[PathLike]) -> "tuple[Corpus, Documents, Documents]":
    """(corpus, train documents, held-out documents): tokenised once under `main_process_first`
    (rank 0 fills the cache, the others then read it), split by whole documents."""
    with main_process_first():
        corpus = load_corpus([str(p) for p in paths], tokenizer, text_field=text_field, cache_dir=cache_dir,
                             progress=_progress(progress))
    train_docs, val_docs = corpus.split(eval_fraction, seed=seed)
    return corpus, train_docs, val_docs


def cpt_datasets(paths: Sequence[PathLike], tokenizer, *, block_size: int, eval_fraction: float = 0.0,
                 seed: int = 0, text_field: str = "text", document_mask: bool = True,
                 main_process_first: Callable[[], ContextManager] = nullcontext,
                 progress: Optional[bool] = None, cache_dir: Optional[PathLike] = None) -> StageData:
    """Continued pretraining: (train blocks, held-out blocks or None, info).

    Documents (.txt, .jsonl(.gz) `text_field`; see data/sources.py) are tokenised once (cached as
    memory-mapped uint32 under the cache root), split by whole document (`eval_fraction` of
    them held out, by a permutation seeded with `seed`) and packed into PackedDataset blocks:
    items input_ids / labels [block_size] (+ position_ids, document_ids with document_mask).
    The held-out blocks are min(block_size, held-out tokens) long; too few held-out tokens for
    one block gives None. Raises DataError when the training documents fill no block.
    """
    corpus, train_docs, val_docs = _cpt_split(paths, tokenizer, eval_fraction, seed, text_field,
                                              main_process_first, progress, cache_dir)
    train = pack_documents(train_docs, block_size, document_mask=document_mask)
    held_out = None
    if len(val_docs):
        try:
            held_out = pack_documents(val_docs, min(block_size, max(2, val_docs.n_tokens)), document_mask=document_mask)
        except DataError:
            held_out = None
    info = (f"{len(corpus)} documents, {corpus.n_tokens:,} tokens; train {len(train_docs)} documents -> "
            f"{len(train)} blocks of {block_size}" +
            (f"; held out {len(val_docs)} documents -> {len(held_out)} blocks" if held_out is not None else
             "; no held-out split (--eval-fraction 0 or too few documents)"))
    return StageData(train, held_out, info)


def cpt_held_out_documents(paths: Sequence[PathLike], tokenizer, *, eval_fraction: float, seed: int = 0,
                           text_field: str = "text", main_process_first: Callable[[], ContextManager] = nullcontext,
                           progress: Optional[bool] = None, cache_dir: Optional[PathLike] = None) -> List[np.ndarray]:
    """The documents cpt_datasets holds out of the same files with the same fraction and seed,
    unpacked: one uint32 array of token ids per document (each ending with <|endoftext|>)."""
    _, _, held = _cpt_split(paths, tokenizer, eval_fraction, seed, text_field, main_process_first, progress, cache_dir)
    return [held.doc(k) for k in range(len(held))]


def _split_or_file(full, eval_path: Optional[PathLike], eval_fraction: float, seed: int, load):
    """(train, held_out): `eval_path` loaded with `load` when given, else a seeded split of
    `full` (eval_fraction > 0 and two or more items), else (full, None)."""
    if eval_path is not None:
        return full, load([str(eval_path)])
    if eval_fraction > 0 and len(full) > 1:
        return full.split(eval_fraction, seed=seed)
    return full, None


def sft_datasets(paths: Sequence[PathLike], tokenizer, *, max_len: int, eval_path: Optional[PathLike] = None,
                 eval_fraction: float = 0.0, seed: int = 0, fmt: Optional[str] = "auto",
                 chat_template_kwargs: Optional[Mapping[str, Any]] = None) -> StageData:
    """Instruction SFT: (train samples, held-out samples or None, info).

    Records (alpaca / messages / ShareGPT, `fmt` "auto" or None: detected per file) are encoded
    by data.SFTDataset: items input_ids / labels [L <= max_len], labels -100 off the assistant
    turns. Held out: the samples of `eval_path` when given, else `eval_fraction` of the
    samples (a Subset, by a permutation seeded with `seed`), else None.
    """
    options = dict(max_len=max_len, fmt=None if fmt == "auto" else fmt, chat_template_kwargs=chat_template_kwargs)
    full = SFTDataset([str(p) for p in paths], tokenizer, **options)
    train, held_out = _split_or_file(full, eval_path, eval_fraction, seed, lambda p: SFTDataset(p, tokenizer, **options))
    info = f"{len(train)} training samples ({full.report.summary()})"
    if held_out is not None:
        info += f", {len(held_out)} held-out samples" + (f" from {eval_path}" if eval_path else "")
    return StageData(train, held_out, info)


def preference_datasets(paths: Sequence[PathLike], tokenizer, *, max_len: int, max_prompt_len: Optional[int] = None,
                        eval_path: Optional[PathLike] = None, eval_fraction: float = 0.0, seed: int = 0,
                        chat_template_kwargs: Optional[Mapping[str, Any]] = None,
                        keep_tail: bool = False) -> StageData:
    """Preference pairs (DPO & co.): (train pairs, held-out pairs or None, info).

    Pairs are encoded by data.PreferenceDataset (items: chosen / rejected input_ids and labels
    [L <= max_len], and "margin" where the records have TRL's margin column); held out as in
    sft_datasets. keep_tail: rows are whole rendered conversations (a reward model's input).
    """
    options = dict(max_len=max_len, max_prompt_len=max_prompt_len, chat_template_kwargs=chat_template_kwargs,
                   keep_tail=keep_tail)
    full = PreferenceDataset([str(p) for p in paths], tokenizer, **options)
    train, held_out = _split_or_file(full, eval_path, eval_fraction, seed,
                                     lambda p: PreferenceDataset(p, tokenizer, **options))
    info = (f"{len(train)} training pairs ({full.report.summary()})"
            + (f", {len(held_out)} held-out pairs" if held_out is not None else ""))
    return StageData(train, held_out, info)


def kto_datasets(paths: Sequence[PathLike], tokenizer, *, max_len: int, max_prompt_len: Optional[int] = None,
                 eval_path: Optional[PathLike] = None, eval_fraction: float = 0.0, seed: int = 0,
                 chat_template_kwargs: Optional[Mapping[str, Any]] = None) -> StageData:
    """Unpaired preference rows (KTO): (train rows, held-out rows or None, info).

    Rows (TRL's prompt/completion/label, LLaMA-Factory's messages + label, or preference pairs,
    unpaired) are encoded by data.KTODataset (items: input_ids, labels [L <= max_len],
    prompt_length, label); held out as in sft_datasets (a split of rows).
    """
    options = dict(max_len=max_len, max_prompt_len=max_prompt_len, chat_template_kwargs=chat_template_kwargs)
    full = KTODataset([str(p) for p in paths], tokenizer, **options)
    train, held_out = _split_or_file(full, eval_path, eval_fraction, seed, lambda p: KTODataset(p, tokenizer, **options))
    labels = [bool(train[i]["label"]) for i in range(len(train))]
    info = (f"{len(train)} training rows, {sum(labels)} desirable / {len(labels) - sum(labels)} undesirable "
            f"({full.report.summary()})" + (f", {len(held_out)} held-out rows" if held_out is not None else ""))
    return StageData(train, held_out, info)


def held_out_questions(path: PathLike, n: int) -> List[str]:
    """The first `n` user questions of a messages / alpaca .jsonl file (for sample answers):
    the first user message of each messages record (text parts joined), or instruction + input;
    lines that are not JSON objects, and other records, are passed over."""
    out: List[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if len(out) >= n:
                break
            try:
                row = loads_json(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(row, dict):
                continue
            if "messages" in row:
                users = [_question_text(m.get("content")) for m in row["messages"] if m.get("role") == "user"]
                if users and users[0]:
                    out.append(users[0])
            elif "instruction" in row:
                out.append((row["instruction"] + ("\n\n" + row["input"] if row.get("input") else "")).strip())
    return out


def _question_text(content) -> Optional[str]:
    """A user message's text (its text parts concatenated); None for anything else."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    return None
