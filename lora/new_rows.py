"""Train only the new tokens' rows: a separate trainable parameter, old rows frozen bit-for-bit.
(The trainable side of data.vocab's vocabulary extension; `data.vocab` re-exports it.)

    lora.inject(model, r=16, alpha=16)            # first: inject freezes every parameter
    vocab.train_new_rows(model, ext.ids)          # rows ext.ids of embed_tokens / lm_head train
    ... train (any optimizer, any weight decay) ...
    vocab.merge(model)                            # rows folded in, LoRA merged: plain modules again
    save(model, "out/merged", tokenizer=ext.tokenizer)

`train_new_rows` replaces `embed_tokens` and `lm_head` by `NewRowsEmbedding` / `NewRowsHead`.
Each keeps the original weight (same Parameter, frozen, same state-dict key) and adds `rows`
[k, hidden], the trainable values of rows `ids`, used in their place. Old rows never see a
gradient or an optimizer step, so they stay bit-identical whatever the weight decay; only
k·hidden numbers train (the alternative, `lora.inject(..., modules_to_save=["embed_tokens",
"lm_head"])`, trains full copies of both matrices and all their rows, in PEFT's format).
A tied model gets one `rows` Parameter shared by both wrappers, so it stays tied.

The wrappers are transparent to checkpoints: `state_dict()` writes the weight with the rows
folded in under the original key and no extra key (`keep_vars=True` gives the live
Parameters instead), so `models.qwen.save` of a model that
was not merged still writes the trained rows. `lora.save` writes LoRA tensors only: keep the
rows with `save_new_rows(model, adapter_dir)` / `load_new_rows(model, adapter_dir)`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from fileio.safetensors_file import load_tensors, write_tensors
from models.qwen.module_tree import replace_module

NEW_ROWS_FILE = "new_token_rows.safetensors"
PATHS = {"embed": "model.embed_tokens", "head": "lm_head"}


class _NewRows(nn.Module):
    """Shared part: the original weight (frozen) plus trainable `rows` for ids `ids`."""

    def __init__(self, original: nn.Module, ids: torch.Tensor, rows: nn.Parameter):
        super().__init__()
        weight = original.weight
        weight.requires_grad_(False)
        self.weight = weight
        self.rows = rows
        self.register_buffer("ids", ids.to(weight.device), persistent=False)
        slot = torch.full((weight.shape[0],), -1, dtype=torch.long, device=weight.device)
        slot[self.ids] = torch.arange(len(ids), device=weight.device)
        self.register_buffer("slot", slot, persistent=False)  # id -> index into rows, -1: frozen
        self._original = [original]  # a list: not a submodule (its weight is ours already)
        self._warned = False
        self.register_state_dict_post_hook(_NewRows._merged_state)
        self.register_load_state_dict_pre_hook(_NewRows._rows_from_state)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The weight with the trained rows written in (a new tensor)."""
        return self.weight.detach().index_copy(0, self.ids, self.rows.detach().to(self.weight.dtype))

    def unwrap(self) -> nn.Module:
        """The original module with the trained rows written into its weight (in place)."""
        with torch.no_grad():
            self.weight[self.ids] = self.rows.detach().to(self.weight.dtype)
        return self._original[0]  # it holds the same weight Parameter

    def _check_trainable(self) -> None:
        if self.training and torch.is_grad_enabled() and not self.rows.requires_grad and not self._warned:
            self._warned = True
            warnings.warn("the new-token rows are frozen: lora.inject freezes every parameter, so call "
                          "vocab.train_new_rows after lora.inject")

    @staticmethod
    def _merged_state(module, state_dict, prefix, local_metadata) -> None:
        if isinstance(state_dict.get(prefix + "weight"), nn.Parameter):
            return  # state_dict(keep_vars=True): the caller wants the live Parameters
        state_dict[prefix + "weight"] = module.merged_weight()
        state_dict.pop(prefix + "rows", None)

    @staticmethod
    def _rows_from_state(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
        if prefix + "weight" in state_dict and prefix + "rows" not in state_dict:
            weight = state_dict[prefix + "weight"]
            state_dict[prefix + "rows"] = weight[module.ids.to(weight.device)].to(module.rows.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]} x {self.weight.shape[1]}, trainable rows={len(self.ids)}"


class NewRowsEmbedding(_NewRows):
    """nn.Embedding whose rows `ids` are the trainable `rows`: ids [B, T] -> [B, T, hidden]."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        self._check_trainable()
        out = F.embedding(input_ids, self.weight)
        slot = self.slot[input_ids]
        new = F.embedding(slot.clamp_min(0), self.rows).to(out.dtype)
        return torch.where((slot >= 0).unsqueeze(-1), new, out)


class NewRowsHead(_NewRows):
    """Bias-free output head whose logits for `ids` come from `rows`: [..., hidden] -> [..., vocab]."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self._check_trainable()
        logits = self._original[0](hidden)  # the original head (its fast bf16 path on CPU)
        new = F.linear(hidden, self.rows.to(hidden.dtype))
        return logits.index_copy(-1, self.ids, new.to(logits.dtype))


def new_row_modules(model: nn.Module) -> dict[str, _NewRows]:
    """Module path -> NewRowsEmbedding / NewRowsHead, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _NewRows)}


def train_new_rows(
    model: nn.Module, ids: Sequence[int], dtype: Optional[torch.dtype] = torch.float32
) -> list[nn.Parameter]:
    """Make rows `ids` of embed_tokens and lm_head trainable and freeze the rest of both matrices.

    Call after `lora.inject` (which freezes every parameter). The rows start from the current
    values (the mean initialisation of `add_tokens`). dtype: of the trainable rows (default
    float32, like LoRA weights; None: the weight's dtype). Returns the new parameters (one
    for a tied model, two otherwise).
    """
    if new_row_modules(model):
        raise ValueError("the model already trains new-token rows: vocab.merge(model) first")
    embed = model.get_submodule(PATHS["embed"])
    head = model.get_submodule(PATHS["head"])
    if not isinstance(embed, nn.Embedding):
        raise ValueError(f"{PATHS['embed']} is a {type(embed).__name__}, not an nn.Embedding "
                         "(is it in modules_to_save? use one of the two ways to train new rows)")
    if not isinstance(head, nn.Linear) or head.bias is not None:
        raise ValueError(f"lm_head is a {type(head).__name__}{' with a bias' if isinstance(head, nn.Linear) else ''}: "
                         "new rows train in a plain bias-free 16-bit head (not 4-bit, not in modules_to_save)")
    rows = embed.weight.shape[0]
    if not isinstance(ids, torch.Tensor):
        ids = list(ids)
    ids = torch.as_tensor(ids, dtype=torch.long).flatten().unique(sorted=True)
    if ids.numel() == 0:
        raise ValueError("train_new_rows needs at least one token id")
    if int(ids[0]) < 0 or int(ids[-1]) >= rows:
        raise ValueError(f"token ids must be in [0, {rows}), got {int(ids[0])}..{int(ids[-1])}")
    tied = head.weight is embed.weight

    def trainable(weight: torch.Tensor) -> nn.Parameter:
        values = weight.detach()[ids.to(weight.device)].clone()
        return nn.Parameter(values.to(dtype) if dtype is not None else values)

    embed_rows = trainable(embed.weight)
    head_rows = embed_rows if tied else trainable(head.weight)
    replace_module(model, PATHS["embed"], NewRowsEmbedding(embed, ids, embed_rows))
    replace_module(model, PATHS["head"], NewRowsHead(head, ids, head_rows))
    return [embed_rows] if tied else [embed_rows, head_rows]


@torch.no_grad()
def merge_new_rows(model: nn.Module) -> nn.Module:
    """Write the trained rows into the weights and put the plain modules back; returns `model`."""
    for path, module in new_row_modules(model).items():
        replace_module(model, path, module.unwrap())
    return model


def merge(model: nn.Module) -> nn.Module:
    """Everything trained folded in: new-token rows (merge_new_rows), then LoRA (lora.merge)."""
    from .inject import has_adapters
    from .merge import merge as merge_adapters

    had_rows = bool(new_row_modules(model))
    merge_new_rows(model)
    if has_adapters(model):
        merge_adapters(model)
    elif not had_rows:
        raise ValueError(f"{type(model).__name__} holds neither new-token rows nor LoRA adapters to merge")
    return model


# ---------------------------------------------------------------------- rows next to an adapter
def new_rows_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"ids": [k], "model.embed_tokens": [k, hidden], "lm_head": [k, hidden] (untied only)}."""
    modules = new_row_modules(model)
    if not modules:
        raise ValueError("the model trains no new-token rows (vocab.train_new_rows)")
    embed, head = modules[PATHS["embed"]], modules[PATHS["head"]]
    out = {"ids": embed.ids.detach().cpu(), PATHS["embed"]: embed.rows.detach().cpu()}
    if head.rows is not embed.rows:
        out[PATHS["head"]] = head.rows.detach().cpu()
    return {k: v.contiguous() for k, v in out.items()}


def save_new_rows(model: nn.Module, path: Union[str, os.PathLike]) -> Path:
    """Write the trained rows to `path`/new_token_rows.safetensors (e.g. next to lora.save's files)."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    state = new_rows_state_dict(model)
    write_tensors(state, root / NEW_ROWS_FILE, metadata={"format": "pt"})  # renamed into place when complete
    return root / NEW_ROWS_FILE


@torch.no_grad()
def load_new_rows(model: nn.Module, path: Union[str, os.PathLike]) -> nn.Module:
    """Load rows written by save_new_rows: into the training wrappers if the model has them,
    else straight into the weights of a plain model (e.g. the 16-bit base before merging)."""
    file = Path(path) / NEW_ROWS_FILE if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: not found (written by vocab.save_new_rows)")
    state = load_tensors(file)
    if "ids" not in state or PATHS["embed"] not in state:
        raise ValueError(f"{file}: expected tensors 'ids' and {PATHS['embed']!r}, got {sorted(state)}")
    ids = state["ids"].long()
    modules = new_row_modules(model)
    targets = {p: modules[p] if p in modules else model.get_submodule(p) for p in PATHS.values()}
    tied = targets[PATHS["head"]].weight is targets[PATHS["embed"]].weight
    if tied != (PATHS["head"] not in state):
        raise ValueError(f"{file}: rows of a {'tied' if PATHS['head'] not in state else 'untied'} model, "
                         f"but this model is {'tied' if tied else 'untied'}")
    for p, module in targets.items():
        values = state.get(p, state[PATHS["embed"]])
        rows = module.weight.shape[0]
        if int(ids.max()) >= rows or values.shape != (len(ids), module.weight.shape[1]):
            raise ValueError(f"{file}: {p} rows {tuple(values.shape)} for ids up to {int(ids.max())} do not fit "
                             f"{p}.weight {tuple(module.weight.shape)}")
        if isinstance(module, _NewRows):
            if not torch.equal(module.ids.cpu(), ids):
                raise ValueError(f"{file}: rows for ids {ids.tolist()[:6]}..., the model trains {module.ids.tolist()[:6]}...")
            module.rows.copy_(values)
        else:
            module.weight[ids.to(module.weight.device)] = values.to(module.weight.device, module.weight.dtype)
    return model
