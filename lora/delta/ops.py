"""Whole-checkpoint weight arithmetic: diff, apply, task arithmetic and the instruction residual.

Every function reads HF-format checkpoint directories and writes a new one, streaming (see
`combine`), atomically (temp dir + rename), with a manifest.json naming the inputs with the
sha256 of their weight files, the scales and the tensors left unchanged. Inputs are never
modified. Output tensors keep the layout of one input (the target, or the first model):
same names, same shards, same index format, same dtype unless `dtype` says otherwise.
"""

from __future__ import annotations

import fnmatch
import math
import shutil
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

import torch

from fileio.atomic import atomic_directory
from fileio.folder import FOLDER_FILES
from fileio.hashing import sha256_file
from fileio.safe_load import read_json
from models.qwen import ENDOFTEXT_ID, IM_END_ID, IM_START_ID
from models.qwen.config import dtype_from_name, dtype_name

from .combine import Plan, Term, check_compatible, run_plan
from .groups import group_scales, module_group, special_row_plan
from .io import MANIFEST, DeltaError, ModelFolder, PathLike, check_output_path, write_json

IM_END = "<|im_end|>"


def _dtype(dtype) -> Optional[torch.dtype]:
    try:
        d = dtype_from_name(dtype)
    except ValueError as e:
        raise DeltaError(f"dtype: {e}") from None
    if d is not None and not d.is_floating_point:
        raise DeltaError(f"dtype {dtype!r}: expected a floating dtype")
    return d


def _inputs_record(checkpoints: Sequence[ModelFolder], hash_inputs: bool) -> dict:
    rec = {}
    for ck in checkpoints:
        entry = {"path": str(ck.root.resolve())}
        if hash_inputs:
            entry["sha256"] = ck.weight_hashes()
        if ck.manifest:
            entry["manifest_kind"] = ck.manifest.get("kind")
        rec[ck.role] = entry
    return rec


def _write_manifest(tmp: Path, manifest: dict) -> None:
    """manifest.json, with the sha256 of every output shard, as the last file of the output."""
    manifest["outputs"] = {
        "sha256": {p.name: sha256_file(p) for p in sorted(tmp.glob("*.safetensors"))},
    }
    write_json(tmp / MANIFEST, manifest)


def _copy_config(src: ModelFolder, tmp: Path, dtype: Optional[torch.dtype], **updates) -> None:
    cfg = dict(src.raw_config)
    if dtype is not None:
        cfg["torch_dtype"] = cfg["dtype"] = dtype_name(dtype)
    cfg.update(updates)
    write_json(tmp / "config.json", cfg)


def _copy_model_files(src: ModelFolder, tmp: Path) -> None:
    """generation_config.json and tokenizer files of `src`, as they are."""
    for name in ("generation_config.json",) + FOLDER_FILES:
        if (src.root / name).exists():
            shutil.copy2(src.root / name, tmp / name)


def _skip_matcher(patterns: Iterable[str]):
    patterns = list(patterns or ())
    return lambda key: any(fnmatch.fnmatchcase(key, p) for p in patterns)


# ---------------------------------------------------------------------- diff / apply
def diff(
    a: PathLike,
    b: PathLike,
    out: PathLike,
    *,
    dtype: Union[str, torch.dtype, None] = "float32",
    overwrite: bool = False,
    hash_inputs: bool = True,
    check_dtypes: bool = True,
) -> Path:
    """Write the delta checkpoint a - b to `out` (same tensor names and shards as `a`).

    dtype: storage dtype of the delta (default float32: the difference of two 16-bit values
    is exact in float32; pass "bfloat16" to halve the size at the cost of rounding).
    The directory holds a copy of a's config.json and a manifest with output "delta", which
    `apply`, `task_arithmetic`, `extract_lora` and `delta_report` recognise.
    """
    ca, cb = ModelFolder(a, "a"), ModelFolder(b, "b")
    out = Path(out)
    dt = _dtype(dtype)
    check_compatible([ca, cb], check_dtypes=[ca, cb] if check_dtypes else [])
    check_output_path(out, [ca, cb], overwrite)
    plan = Plan(layout=ca, anchor=None, terms=[Term(ca, cb, lambda k: 1.0)], dtype=dt)
    with atomic_directory(out, fsync=False) as tmp:
        stats = run_plan(plan, tmp)
        _copy_config(ca, tmp, dt)
        manifest = {
            "tool": "lora.delta", "kind": "diff", "output": "delta", "formula": "a - b",
            "inputs": _inputs_record([ca, cb], hash_inputs), "dtype": dtype_name(dt) if dt else None,
            "tensors": stats["tensors"], "skipped": [], "compute_dtypes": stats["compute_dtypes"],
        }
        _write_manifest(tmp, manifest)
    return out


def apply(
    target: PathLike,
    delta: PathLike,
    out: PathLike,
    scale: float = 1.0,
    *,
    scales: Optional[Mapping[str, float]] = None,
    skip_embeddings: bool = False,
    skip: Iterable[str] = (),
    dtype: Union[str, torch.dtype, None] = None,
    overwrite: bool = False,
    hash_inputs: bool = True,
) -> Path:
    """Write target + scale * delta (per-group `scales` multiply `scale`) to `out`.

    `delta` must be a directory written by `diff` / `task_arithmetic` (manifest output
    "delta"): adding a full model by mistake would double every weight. The output keeps
    the target's layout, dtype (unless `dtype`), config, generation config and tokenizer.
    Tensors matched by `skip` (glob patterns) or by a zero scale are copied from the target.
    """
    ct, cd = ModelFolder(target, "target"), ModelFolder(delta, "delta")
    if not cd.is_delta:
        raise DeltaError(
            f"{cd.root}: not a delta checkpoint (its manifest.json does not say output 'delta'); "
            f"write one with lora.delta.diff, or use instruction_residual(base, chat, target)"
        )
    out = Path(out)
    dt = _dtype(dtype)
    check_compatible([ct, cd])
    check_output_path(out, [ct, cd], overwrite)
    eff = group_scales(scale, scales, skip_embeddings)
    skipped = _skip_matcher(skip)
    coef = lambda k: 0.0 if skipped(k) else eff[module_group(k)]  # noqa: E731
    plan = Plan(layout=ct, anchor=ct, terms=[Term(cd, None, coef)], dtype=dt)
    with atomic_directory(out, fsync=False) as tmp:
        stats = run_plan(plan, tmp)
        _copy_config(ct, tmp, dt)
        _copy_model_files(ct, tmp)
        manifest = {
            "tool": "lora.delta", "kind": "apply", "output": "model", "formula": "target + scale_g * delta",
            "inputs": _inputs_record([ct, cd], hash_inputs), "scale": scale, "group_scales": dict(scales or {}),
            "effective_scales": eff, "skipped": _skipped_records(stats, skipped, skip_embeddings),
            "dtype": dtype_name(dt) if dt else None, "tensors": stats["tensors"], "compute_dtypes": stats["compute_dtypes"],
        }
        _write_manifest(tmp, manifest)
    return out


def _skipped_records(stats: dict, skipped, skip_embeddings: bool) -> list[dict]:
    recs = []
    for key in stats["copied"]:
        if skipped(key):
            reason = "matched skip pattern"
        elif skip_embeddings and module_group(key) == "embeddings":
            reason = "embeddings skipped"
        else:
            reason = "scale 0"
        recs.append({"tensor": key, "reason": reason})
    return recs


# ---------------------------------------------------------------------- task arithmetic
def task_arithmetic(
    deltas: Sequence[PathLike],
    weights: Sequence[float],
    out: PathLike,
    *,
    base: Optional[PathLike] = None,
    dtype: Union[str, torch.dtype, None] = None,
    overwrite: bool = False,
    hash_inputs: bool = True,
) -> Path:
    """Write base + sum_i weights[i] * deltas[i] (a model), or the sum alone without a base (a delta).

    Weights are used as given: negative weights (task negation) are allowed and nothing is
    normalised. Each entry of `deltas` must be a delta directory written by `diff`.
    dtype default: the base's dtype per tensor; without a base, the first delta's.
    """
    if len(deltas) == 0:
        raise DeltaError("task_arithmetic: no deltas given")
    if len(weights) != len(deltas):
        raise DeltaError(f"task_arithmetic: {len(deltas)} deltas but {len(weights)} weights")
    ws = []
    for i, w in enumerate(weights):
        try:
            w = float(w)
        except (TypeError, ValueError):
            raise DeltaError(f"task_arithmetic: weight {i} ({w!r}) is not a number") from None
        if not math.isfinite(w):
            raise DeltaError(f"task_arithmetic: weight {i} is {w}, expected a finite number")
        ws.append(w)
    cds = [ModelFolder(d, f"delta {i}") for i, d in enumerate(deltas)]
    for cd in cds:
        if not cd.is_delta:
            raise DeltaError(f"{cd.root} ({cd.role}): not a delta checkpoint (write deltas with lora.delta.diff)")
    cb = ModelFolder(base, "base") if base is not None else None
    out = Path(out)
    dt = _dtype(dtype)
    every = ([cb] if cb else []) + cds
    check_compatible(every)
    check_output_path(out, every, overwrite)
    terms = [Term(cd, None, (lambda w: (lambda k: w))(w)) for cd, w in zip(cds, ws)]
    layout = cb or cds[0]
    plan = Plan(layout=layout, anchor=cb, terms=terms, dtype=dt)
    with atomic_directory(out, fsync=False) as tmp:
        stats = run_plan(plan, tmp)
        _copy_config(layout, tmp, dt)
        if cb:
            _copy_model_files(cb, tmp)
        manifest = {
            "tool": "lora.delta", "kind": "task_arithmetic", "output": "model" if cb else "delta",
            "formula": ("base + " if cb else "") + "sum_i w_i * delta_i", "weights": ws,
            "inputs": _inputs_record(every, hash_inputs), "dtype": dtype_name(dt) if dt else None,
            "tensors": stats["tensors"], "skipped": [], "compute_dtypes": stats["compute_dtypes"],
        }
        _write_manifest(tmp, manifest)
    return out


# ---------------------------------------------------------------------- instruction residual
def instruction_residual(
    base: PathLike,
    chat: PathLike,
    target: PathLike,
    out: PathLike,
    scale: float = 1.0,
    *,
    scales: Optional[Mapping[str, float]] = None,
    skip_embeddings: bool = False,
    skip: Iterable[str] = (),
    special_rows: str = "auto",
    special_token_ids: Sequence[int] = (IM_START_ID, IM_END_ID),
    dtype: Union[str, torch.dtype, None] = None,
    check_dtypes: bool = True,
    overwrite: bool = False,
    hash_inputs: bool = True,
) -> Path:
    """target + scale_g * (chat - base) in one streaming pass (arXiv 2410.10739, the "chat vector").

    base/chat: a base model and its chat/instruct version; target: a model derived from the
    same base (e.g. after continued pretraining). scale_g = scale x scales[group] for the
    groups "attention", "mlp", "embeddings", "norms"; skip_embeddings leaves embeddings and
    head as in the target; `skip` takes glob patterns of tensor names left as in the target.
    Tied checkpoints are combined over unique storage (the embedding; a redundant stored head
    is written as a copy of the result).

    Special-token rows (`special_token_ids`, default <|im_start|>, <|im_end|>) of the embedding
    and head take the chat model's values, whatever the scales, when
      special_rows="auto": the row is untrained in the base or in the target (norm below 10%
        of the median norm of ordinary rows, as in a base model that never saw ChatML);
      special_rows="always": always; special_rows="never": never (plain formula).

    The output carries the chat model's tokenizer files and chat template, its
    generation_config.json, and eos <|im_end|> in config.json, generation_config.json and
    tokenizer_config.json; the rest of config.json is the target's.
    """
    cb, cc, ct = ModelFolder(base, "base"), ModelFolder(chat, "chat"), ModelFolder(target, "target")
    out = Path(out)
    dt = _dtype(dtype)
    check_compatible([ct, cb, cc], check_dtypes=[ct, cb, cc] if check_dtypes else [])
    check_output_path(out, [cb, cc, ct], overwrite)
    eff = group_scales(scale, scales, skip_embeddings)
    skipped = _skip_matcher(skip)
    coef = lambda k: 0.0 if skipped(k) else eff[module_group(k)]  # noqa: E731
    overrides, special_records = special_row_plan(special_rows, list(special_token_ids), cc, cb, ct)
    plan = Plan(layout=ct, anchor=ct, terms=[Term(cc, cb, coef)], dtype=dt, row_overrides=overrides)
    with atomic_directory(out, fsync=False) as tmp:
        stats = run_plan(plan, tmp)
        warnings = write_chat_files(cc, ct, tmp, dt)
        manifest = {
            "tool": "lora.delta", "kind": "instruction_residual", "output": "model",
            "formula": "target + scale_g * (chat - base)",
            "inputs": _inputs_record([cb, cc, ct], hash_inputs), "scale": scale,
            "group_scales": dict(scales or {}), "effective_scales": eff,
            "skipped": _skipped_records(stats, skipped, skip_embeddings),
            "special_rows": {"mode": special_rows, "ids": list(special_token_ids), "rows": special_records},
            "eos_token_id": IM_END_ID, "dtype": dtype_name(dt) if dt else None,
            "tensors": stats["tensors"], "compute_dtypes": stats["compute_dtypes"], "warnings": warnings,
        }
        _write_manifest(tmp, manifest)
    return out


def write_chat_files(chat: ModelFolder, target: ModelFolder, tmp: Path, dtype: Optional[torch.dtype]) -> list[str]:
    """config.json (target's, eos <|im_end|>), the chat model's generation config and tokenizer
    files with eos <|im_end|>. Returns warnings (e.g. no chat template found) for the manifest."""
    warnings: list[str] = []
    _copy_config(target, tmp, dtype, eos_token_id=IM_END_ID)
    for name in FOLDER_FILES:
        if (chat.root / name).exists():
            shutil.copy2(chat.root / name, tmp / name)
    gen_src = chat.root / "generation_config.json"
    if not gen_src.exists():
        gen_src = target.root / "generation_config.json"
        warnings.append("chat model has no generation_config.json: used the target's")
    gen = _load_json(gen_src) if gen_src.exists() else {}
    eos = gen.get("eos_token_id")
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    # <|im_end|> first (ends a chat turn), <|endoftext|> kept so raw text still stops.
    gen["eos_token_id"] = [IM_END_ID] + [e for e in eos + [ENDOFTEXT_ID] if e != IM_END_ID]
    gen["eos_token_id"] = list(dict.fromkeys(gen["eos_token_id"]))
    gen.setdefault("bos_token_id", chat.raw_config.get("bos_token_id", ENDOFTEXT_ID))
    gen.setdefault("pad_token_id", ENDOFTEXT_ID)
    write_json(tmp / "generation_config.json", gen)
    tok_cfg_path = tmp / "tokenizer_config.json"
    has_template = (tmp / "chat_template.jinja").exists() or (tmp / "chat_template.json").exists()
    if tok_cfg_path.exists():
        tok_cfg = _load_json(tok_cfg_path)
        tok_cfg["eos_token"] = IM_END
        has_template = has_template or bool(tok_cfg.get("chat_template"))
        write_json(tok_cfg_path, tok_cfg)
    else:
        warnings.append(f"{chat.root}: no tokenizer_config.json: the output has no tokenizer config")
    if not has_template:
        warnings.append(f"{chat.root}: no chat template found (tokenizer_config.json chat_template / chat_template.jinja)")
    return warnings


def _load_json(path: Path) -> dict:
    return read_json(path, DeltaError, dict)
