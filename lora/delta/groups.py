"""Module groups of a Qwen checkpoint (for per-group scales and reports) and the rule for the
ChatML special-token rows.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional

import torch

from .io import EMBED, HEAD, DeltaError, ModelFolder

GROUPS = ("attention", "mlp", "embeddings", "norms")

_LAYER = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")


def module_group(key: str) -> str:
    """'attention' | 'mlp' | 'embeddings' | 'norms' for a tensor name (HF Qwen2/Qwen3 or Qwen v1).

    q_norm / k_norm (Qwen3) are norms, not attention: they are scale vectors like the layer norms.
    """
    if key in (EMBED, HEAD) or key == "transformer.wte.weight":
        return "embeddings"
    last = key.rsplit(".", 2)[-2] if "." in key else key
    if "norm" in last or last.startswith("ln_"):
        return "norms"
    if ".self_attn." in key or ".attn." in key:
        return "attention"
    if ".mlp." in key:
        return "mlp"
    raise DeltaError(f"tensor {key!r}: not a known Qwen tensor (expected attention, mlp, embedding or norm)")


def layer_index(key: str) -> Optional[int]:
    """Decoder layer number of a tensor name, None for embeddings / final norm / head."""
    m = _LAYER.search(key)
    return int(m.group(1)) if m else None


def group_scales(scale: float, scales: Optional[Mapping[str, float]], skip_embeddings: bool) -> dict[str, float]:
    """Effective scale per group: scale x scales[group] (default 1), embeddings 0 when skipped."""
    scales = dict(scales or {})
    unknown = sorted(set(scales) - set(GROUPS))
    if unknown:
        raise DeltaError(f"scales: unknown group {unknown[0]!r}: expected one of {list(GROUPS)}")
    out = {g: float(scale) * float(scales.get(g, 1.0)) for g in GROUPS}
    if skip_embeddings:
        out["embeddings"] = 0.0
    return out


# ---------------------------------------------------------------------- special-token rows
UNTRAINED_RATIO = 0.1  # a row whose norm is below 10% of a typical row's is untrained
REFERENCE_ROWS = 8192  # typical rows: the first ones, the most frequent byte/BPE tokens


def row_norms(ck: ModelFolder, key: str, rows: list[int]) -> torch.Tensor:
    """L2 norms (float64) of the given rows of tensor `key`."""
    return torch.stack([ck.read(key, r, r + 1)[0].double().norm() for r in rows])


def reference_norm(ck: ModelFolder, key: str, exclude: set[int]) -> float:
    """Median row norm over the first REFERENCE_ROWS rows (skipping `exclude`)."""
    n = min(ck.info(key).shape[0], REFERENCE_ROWS)
    norms = ck.read(key, 0, n).double().norm(dim=1)
    keep = torch.tensor([i not in exclude for i in range(n)])
    return float(norms[keep].median()) if keep.any() else 0.0


def untrained_rows(ck: ModelFolder, key: str, ids: list[int]) -> list[int]:
    """Rows among `ids` whose norm is below UNTRAINED_RATIO x the median norm of ordinary rows.

    Untrained rows (tokens the model never saw, e.g. ChatML tokens in a base model) are left
    at zero or at a tiny initialisation by the pretraining run; trained rows are not.
    """
    ref = reference_norm(ck, key, set(ids))
    norms = row_norms(ck, key, ids)
    return [i for i, n in zip(ids, norms.tolist()) if n <= UNTRAINED_RATIO * ref]


def special_row_plan(
    mode: str,
    ids: list[int],
    chat: ModelFolder,
    base: ModelFolder,
    target: ModelFolder,
) -> tuple[dict[str, dict[int, ModelFolder]], list[dict]]:
    """Which rows of the embedding / head take the chat model's values.

    mode "never": none. "always": every id in `ids`. "auto" (default of `instruction_residual`):
    a row is carried over when it is untrained in the base or in the target (see
    `untrained_rows`); there target + (chat - base) would add the chat model's trained row
    to a meaningless one, and the result would not be the chat model's <|im_start|>/<|im_end|>.
    Tied checkpoints have one such tensor (the embedding); untied ones have two.
    Returns ({tensor: {row: chat}}, manifest records).
    """
    if mode not in ("auto", "always", "never"):
        raise DeltaError(f"special_rows={mode!r}: expected 'auto', 'always' or 'never'")
    overrides: dict[str, dict[int, ModelFolder]] = {}
    records: list[dict] = []
    if mode == "never" or not ids:
        return overrides, records
    keys = [EMBED] + ([] if target.tied else [HEAD])
    for key in keys:
        if key not in target.tensors:
            continue
        rows = target.info(key).shape[0]
        outside = [i for i in ids if not 0 <= i < rows]
        if outside and mode == "always":
            raise DeltaError(f"special token id {outside[0]} is outside the {rows} rows of {key!r}")
        for i in outside:  # auto: a vocabulary without the token has no row to carry
            records.append({"tensor": key, "row": i, "carried": False, "reason": f"outside the {rows} rows"})
        present = [i for i in ids if 0 <= i < rows]
        if not present:
            continue
        if mode == "always":
            chosen = {i: "special_rows='always'" for i in present}
        else:
            chosen = {}
            for ck, name in ((base, "base"), (target, "target")):
                for i in untrained_rows(ck, key, present):
                    chosen.setdefault(i, f"row untrained in {name}")
        if chosen:
            overrides[key] = {i: chat for i in sorted(chosen)}
        chat_untrained = set(untrained_rows(chat, key, present)) if chosen else set()
        for i in present:
            rec = {"tensor": key, "row": i, "carried": i in chosen, "reason": chosen.get(i, "trained in base and target")}
            if i in chosen and i in chat_untrained:
                rec["warning"] = "the chat model's row looks untrained too"
            records.append(rec)
    return overrides, records
