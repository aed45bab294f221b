"""The training and held-out data of a stage, built from its flags (tokenised before any model loads).

    train_ds, held_out, info = cpt_datasets(paths, tok, block_size=2048, eval_fraction=0.05, seed=0)
    train_ds, held_out, info = sft_datasets(paths, eval_path, tok, max_len=1024, eval_fraction=0.05, seed=0)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence


def cpt_datasets(paths: Sequence[Path], tok, *, block_size: int, eval_fraction: float, seed: int,
                 text_field: str = "text", document_mask: bool = True):
    """(train blocks, held-out blocks or None, description) for continued pretraining.

    Documents are tokenised once (cached as memory-mapped uint32 under the cache root), split
    by whole document into train/held-out, and packed into blocks with document masking.
    """
    from data import DataError, load_corpus, pack_documents
    from train import distributed

    # Under torchrun rank 0 tokenises into the cache first and the other ranks read it: ranks
    # writing one cache at once raced (a rank that found it half-there rebuilt it under the other).
    with distributed.main_process_first():
        corpus = load_corpus([str(p) for p in paths], tok, text_field=text_field, progress=sys.stderr.isatty())
    train_docs, val_docs = corpus.split(eval_fraction, seed=seed)
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
    return train, held_out, info


def sft_datasets(paths: Sequence[Path], eval_path: Optional[Path], tok, *, max_len: int, eval_fraction: float,
                 seed: int, fmt: str = "auto", chat_template_kwargs: Optional[dict] = None):
    """(train samples, held-out samples or None, description) for SFT (labels on answers)."""
    from data import SFTDataset

    fmt = None if fmt == "auto" else fmt
    options = dict(max_len=max_len, fmt=fmt, chat_template_kwargs=chat_template_kwargs)
    full = SFTDataset([str(p) for p in paths], tok, **options)
    if eval_path is not None:
        train, held_out = full, SFTDataset([str(eval_path)], tok, **options)
    elif eval_fraction > 0 and len(full) > 1:
        train, held_out = full.split(eval_fraction, seed=seed)
    else:
        train, held_out = full, None
    info = f"{len(train)} training samples ({full.report.summary()})"
    if held_out is not None:
        info += f", {len(held_out)} held-out samples" + (f" from {eval_path}" if eval_path else "")
    return train, held_out, info


def held_out_questions(path: Path, n: int) -> list[str]:
    """The first `n` user questions of a messages/alpaca .jsonl file (for sample answers)."""
    import json

    from fileio.safe_load import loads_json

    out = []
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
