"""Give new tokens rows in a Qwen model: padding rows first, growth only when they run out.

    ext = add_tokens(model, tok, ["数据库系统", " getaddrinfo"])   # VocabExtension
    ext.tokenizer                                                  # the extended Tokenizer
    ext.ids, ext.rows_before, ext.rows_after

Qwen checkpoints have more embedding rows than tokens (Qwen2.5: 151936 rows, 151665 tokens):
the rows past ``len(tokenizer)`` are untrained padding, so new tokens take them first and the
matrices keep their shape. Only when they run out do the embedding and the (untied) output
head grow, to the next multiple of 128, with a warning (a resize is never silent); the extra
padding rows get the mean of the rows of the old tokenizer's ids (HF's mean resizing), and
`config.vocab_size` follows.

Each new row starts as the mean of the rows of the token's old pieces (what the old
tokenizer made of its text), on the input side (embed_tokens) and, for an untied model, on
the output side (lm_head) from lm_head's own rows. A tied model keeps one shared matrix.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import List, Sequence

import torch
from torch import nn

from models.qwen.tokenizer import Tokenizer

ROW_MULTIPLE = 128


@dataclass
class VocabExtension:
    """What `add_tokens` / `extend_model` did."""

    tokenizer: Tokenizer  # the extended tokenizer (save it with the model)
    tokens: List[str]
    ids: List[int]
    pieces: List[List[int]]  # old-tokenizer ids averaged into each new row
    rows_before: int
    rows_after: int
    tied: bool

    @property
    def grew(self) -> bool:
        return self.rows_after > self.rows_before

    def __str__(self) -> str:
        first, last = (self.ids[0], self.ids[-1]) if self.ids else (None, None)
        rows = (f"embedding grew {self.rows_before} -> {self.rows_after} rows (multiple of {ROW_MULTIPLE})"
                if self.grew else f"taken from the untrained padding rows (still {self.rows_after} rows)")
        return (f"added {len(self.ids)} tokens as ids {first}..{last} (tokenizer {len(self.tokenizer)} tokens); "
                f"{rows}; each row = mean of its old pieces ({'tied' if self.tied else 'input and output side'})")


def rows_for(n_tokens: int, rows: int, multiple: int = ROW_MULTIPLE) -> int:
    """Rows a model needs for `n_tokens` token ids: the current `rows` while they suffice."""
    if n_tokens <= rows:
        return rows
    return -(-n_tokens // multiple) * multiple


def add_tokens(model: nn.Module, tokenizer: Tokenizer, tokens: Sequence[str]) -> VocabExtension:
    """Add `tokens` to the tokenizer (`with_added_tokens`, which checks them) and give them rows."""
    return extend_model(model, tokenizer, tokenizer.with_added_tokens(tokens))


def _embedding_and_head(model: nn.Module) -> tuple[nn.Embedding, nn.Linear]:
    embed = model.get_submodule("model.embed_tokens")
    head = model.get_submodule("lm_head")
    for name, module, kind in (("model.embed_tokens", embed, nn.Embedding), ("lm_head", head, nn.Linear)):
        if not isinstance(module, kind):
            raise ValueError(
                f"{name} is a {type(module).__name__}, not a plain {kind.__name__}: add tokens to the 16-bit model "
                "before lora.inject, vocab.train_new_rows or 4-bit quantisation (merge first if it holds adapters)"
            )
    return embed, head


@torch.no_grad()
def extend_model(model: nn.Module, old: Tokenizer, new: Tokenizer) -> VocabExtension:
    """Give the tokens `new` adds to `old` their rows in `model` (in place), mean-initialised.

    `new` must be `old` plus text tokens with ids from len(old) (as `old.with_added_tokens`
    makes it). The model must have a row for every id of `old`.
    """
    embed, head = _embedding_and_head(model)
    added = {t.id: t for t in new.added_tokens}
    for t in old.added_tokens:
        if added.get(t.id) != t:
            raise ValueError(f"the new tokenizer does not extend the old one: added token id {t.id} "
                             f"({t.content!r}) differs")
    fresh = [t for t in new.added_tokens if t.id >= len(old)]
    if not fresh:
        raise ValueError(f"the new tokenizer ({len(new)} tokens) adds no tokens to the old one ({len(old)})")
    if [t.id for t in fresh] != list(range(len(old), len(new))) or not all(t.is_text for t in fresh):
        raise ValueError("the new tokens must be text tokens with consecutive ids from len(old tokenizer)")
    rows = embed.weight.shape[0]
    if rows < len(old):
        raise ValueError(f"the model has {rows} embedding rows but the tokenizer has {len(old)} tokens: "
                         "not this model's tokenizer")
    tied = head.weight is embed.weight
    if not tied and head.weight.shape[0] != rows:
        raise ValueError(f"lm_head has {head.weight.shape[0]} rows but embed_tokens has {rows}")

    tokens = [t.content for t in fresh]
    pieces = [old.encode(text) for text in tokens]
    target = rows_for(len(new), rows)
    if target > rows:
        warnings.warn(f"{len(new)} tokens need more than the model's {rows} rows: embed_tokens"
                      f"{'' if tied else ' and lm_head'} grow to {target} rows (config.vocab_size follows)")
        _grow(embed, head, target, n_trained=len(old), tied=tied)
    ids = [t.id for t in fresh]
    _init_rows(embed.weight, ids, pieces)
    if not tied:
        _init_rows(head.weight, ids, pieces)
    if hasattr(model, "config"):
        model.config.vocab_size = target
    return VocabExtension(new, tokens, ids, pieces, rows, target, tied)


def _mean_rows(weight: torch.Tensor, pieces: List[int]) -> torch.Tensor:
    """fp32 mean of `weight` rows `pieces` (one cast back at the end)."""
    idx = torch.tensor(pieces, dtype=torch.long, device=weight.device)
    return weight.index_select(0, idx).float().mean(0)


def _init_rows(weight: torch.Tensor, ids: List[int], pieces: List[List[int]]) -> None:
    means = torch.stack([_mean_rows(weight, p) for p in pieces])
    weight[torch.tensor(ids, device=weight.device)] = means.to(weight.dtype)


def _grown(weight: torch.Tensor, rows: int, n_trained: int) -> nn.Parameter:
    """`weight` with rows appended up to `rows`, each the mean of the first `n_trained` rows."""
    out = weight.new_empty((rows, weight.shape[1]))
    out[: weight.shape[0]] = weight
    out[weight.shape[0]:] = weight[:n_trained].float().mean(0).to(weight.dtype)
    return nn.Parameter(out, requires_grad=weight.requires_grad)


def _grow(embed: nn.Embedding, head: nn.Linear, rows: int, n_trained: int, tied: bool) -> None:
    embed.weight = _grown(embed.weight, rows, n_trained)
    embed.num_embeddings = rows
    if tied:
        head.weight = embed.weight
    else:
        head.weight = _grown(head.weight, rows, n_trained)
    head.out_features = rows
