"""The streaming engine behind every delta operation.

Every operation of `lora.delta` is one per-tensor linear combination

    out[k] = anchor[k] + sum_j  c_j(k) * (plus_j[k] - minus_j[k])

(anchor and minus_j optional), e.g. diff: 0 + 1*(a - b); residual: target + s*(chat - base).
It runs tensor by tensor, and inside a tensor in chunks of rows: read the rows of every input
from its memory-mapped shard, upcast, combine, cast once to the output dtype and append the
rows to the output shard. Peak memory is a few row chunks, never a whole model.

Arithmetic dtype: float32 for 16-bit inputs and float64 when an input is float32 or wider.
Either way it is wider than the stored values, so a difference of two stored values is exact
(barring extreme exponent gaps) and base + (chat - base) gives chat back bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from fileio.safetensors_file import SafetensorsWriter
from models.qwen.checkpoint import SAFE_INDEX

from .io import HEAD, DeltaError, ModelFolder, TensorInfo, write_json

# Architecture fields that must agree between inputs. vocab_size is checked through the
# embedding and head shapes, so that the error names the tensor.
ARCH_FIELDS = (
    "model_type", "source_format", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings",
    "attention_bias", "qk_norm",
)

DEFAULT_CHUNK_BYTES = 64 << 20  # float64 bytes of one row chunk of the accumulator


@dataclass
class Term:
    """c(key) * (plus - minus); minus None means just c(key) * plus."""

    plus: ModelFolder
    minus: Optional[ModelFolder]
    coef: Callable[[str], float]


@dataclass
class Plan:
    """What to compute. `layout` fixes the output's tensor names, shards and default dtypes."""

    layout: ModelFolder
    anchor: Optional[ModelFolder]
    terms: list[Term]
    dtype: Optional[torch.dtype] = None  # cast floating outputs to this (default: layout's dtype per tensor)
    # key -> {row: checkpoint whose row replaces the combined row} (special-token rows)
    row_overrides: dict[str, dict[int, ModelFolder]] = field(default_factory=dict)
    chunk_bytes: int = DEFAULT_CHUNK_BYTES

    def inputs(self) -> list[ModelFolder]:
        out = [self.anchor] if self.anchor is not None else []
        for t in self.terms:
            out.append(t.plus)
            if t.minus is not None:
                out.append(t.minus)
        if self.layout not in out:
            out.insert(0, self.layout)
        return out


def check_compatible(checkpoints: list[ModelFolder], check_dtypes: list[ModelFolder] = ()) -> None:
    """Architectures, tied-ness, tensor names, shapes (vocabulary rows included) must agree;
    dtypes too among `check_dtypes`. Errors name the field or tensor and both inputs."""
    ref = checkpoints[0]
    for ck in checkpoints[1:]:
        for name in ARCH_FIELDS:
            a, b = getattr(ref.config, name), getattr(ck.config, name)
            if a != b:
                raise DeltaError(
                    f"config.json field {name!r} differs: {a!r} in {ref.describe()} but {b!r} in {ck.describe()}"
                )
        ref_keys, keys = set(ref.unique_keys()), set(ck.unique_keys())
        for missing, has, lacks in ((ref_keys - keys, ref, ck), (keys - ref_keys, ck, ref)):
            if missing:
                key = sorted(missing)[0]
                raise DeltaError(f"tensor {key!r} is in {has.describe()} but missing from {lacks.describe()}")
        for key in ref.unique_keys():
            a, b = ref.info(key), ck.info(key)
            if a.shape != b.shape:
                what = "vocabulary rows differ: " if key.endswith(("embed_tokens.weight", HEAD)) else ""
                raise DeltaError(
                    f"tensor {key!r}: {what}shape {a.shape} in {ref.describe()} but {b.shape} in {ck.describe()}"
                )
    if len(check_dtypes) > 1:
        first = check_dtypes[0]
        for ck in check_dtypes[1:]:
            for key in first.unique_keys():
                a, b = first.info(key).dtype, ck.info(key).dtype
                if a != b:
                    raise DeltaError(
                        f"tensor {key!r}: dtype {a} in {first.describe()} but {b} in {ck.describe()} "
                        f"(convert one of them, or pass check_dtypes=False)"
                    )


def compute_dtype(infos: list[TensorInfo]) -> torch.dtype:
    """float64 when any input is stored in 32 bits or more, else float32 (see module doc)."""
    if any(i.dtype in (torch.float32, torch.float64) for i in infos):
        return torch.float64
    return torch.float32


def run_plan(plan: Plan, tmp: Path) -> dict:
    """Compute `plan` into directory `tmp` (weights + index only). Returns stats for the manifest:
    {"tensors": n, "copied": [keys copied unchanged], "compute_dtypes": {...}}."""
    layout = plan.layout
    readers = plan.inputs()
    for coef_check in plan.terms:
        for key in layout.tensors:
            c = coef_check.coef(key)
            if not math.isfinite(c):
                raise DeltaError(f"tensor {key!r}: scale {c} is not finite")
    weight_map: dict[str, str] = {}
    total = 0
    copied: list[str] = []
    used_dtypes: set[str] = set()
    for file, keys in layout.file_keys.items():
        entries = []
        for key in keys:
            info = layout.tensors[key]
            dtype = plan.dtype if (plan.dtype is not None and info.dtype.is_floating_point) else info.dtype
            entries.append((key, dtype, info.shape))
        writer = SafetensorsWriter(tmp / file.name, entries, metadata={"format": "pt"}, fsync=True)
        try:
            for key, dtype, shape in entries:
                how = _write_tensor(plan, readers, key, dtype, shape, writer)
                used_dtypes.add(how)
                if how == "copy":
                    copied.append(key)
                weight_map[key] = file.name
                total += TensorInfo(file, dtype, shape).nbytes
        finally:
            writer.close()
    if layout.has_index:
        write_json(tmp / SAFE_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return {"tensors": len(weight_map), "copied": copied, "compute_dtypes": sorted(used_dtypes)}


def _write_tensor(plan: Plan, readers: list[ModelFolder], key: str, dtype, shape, writer) -> str:
    infos = [ck.info(key) for ck in readers]
    if not dtype.is_floating_point:
        # Integer tensors (none in Qwen) cannot be scaled: carry the layout's values.
        writer.write(key, plan.layout.read(key))
        return "copy"
    active = [t for t in plan.terms if t.coef(key) != 0.0]
    overrides = plan.row_overrides.get(plan.layout.source_key(key), {})
    cd = compute_dtype(infos)
    rows = shape[0] if shape else 1
    row_numel = max(1, int(torch.tensor(shape[1:]).prod().item()) if len(shape) > 1 else 1)
    step = max(1, plan.chunk_bytes // (8 * row_numel))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        sl = (r0, r1) if shape else (None, None)
        if plan.anchor is not None:
            acc = plan.anchor.read(key, *sl).to(cd)
        else:
            acc = torch.zeros((r1 - r0,) + tuple(shape[1:]) if shape else (), dtype=cd)
        for term in active:
            d = term.plus.read(key, *sl).to(cd)
            if term.minus is not None:
                d.sub_(term.minus.read(key, *sl).to(cd))
            acc.add_(d, alpha=term.coef(key))
        for row, source in overrides.items():
            if r0 <= row < r1:
                acc[row - r0] = source.read(key, row, row + 1)[0].to(cd)
        writer.write(key, acc.to(dtype))
    if not active and not overrides and plan.anchor is not None:
        return "copy"
    return str(cd).replace("torch.", "")
