"""LoRA extraction: the best rank-r approximation of every linear weight delta (truncated SVD,
Eckart-Young), written as a PEFT-format adapter directory.

For a delta D (out, in) with SVD D = U diag(s) V^T, the adapter stores
    lora_B = U_r diag(sqrt(s_r))   (out, r)       lora_A = diag(sqrt(s_r)) V_r^T   (r, in)
with lora_alpha = r, so PEFT's scaling alpha / r is 1 and B @ A is the rank-r truncation.
The singular values are split evenly between A and B so that both factors have the same
scale (a good start if the adapter is trained further). The Frobenius error of each module
is sqrt(sum_{i >= r} s_i^2), the optimum; the retained energy is sum_{i < r} s_i^2 / ||D||^2.

Deltas of tensors a LoRA cannot hold (biases, norms, embeddings, head) are reported with their
norms, not silently dropped.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from fileio.atomic import atomic_directory
from fileio.safetensors_file import SafetensorsWriter
from models.qwen.config import dtype_from_name, dtype_name

from .combine import check_compatible
from .groups import layer_index
from .io import DeltaError, ModelFolder, PathLike, check_output_path, write_json

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LINEAR = re.compile(r"^(model\.layers\.\d+\.(?:self_attn|mlp)\.(\w+))\.weight$")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
REPORT = "extraction_report.json"


@dataclass
class Extraction:
    """What `extract_lora` wrote and how much of the delta it kept."""

    path: Path
    r: int
    modules: list[dict] = field(default_factory=list)  # per module: name, shape, retained_energy, fro_error, rel_error
    layers: list[dict] = field(default_factory=list)  # per decoder layer: retained energy over its modules
    not_representable: list[dict] = field(default_factory=list)  # non-linear tensors with a nonzero delta

    def table(self) -> str:
        lines = [f"rank {self.r}: retained energy per layer", f"{'layer':>5}  {'retained':>9}  {'rel. error':>10}"]
        for row in self.layers:
            lines.append(f"{row['layer']:>5}  {row['retained_energy']:>9.4f}  {row['rel_error']:>10.4f}")
        if self.not_representable:
            lines.append(f"not in the adapter (not linear): {len(self.not_representable)} tensors with a nonzero delta, "
                         f"largest {max(self.not_representable, key=lambda d: d['norm'])['tensor']}")
        return "\n".join(lines)


class _DeltaSource:
    """Delta tensors, either stored (a `diff` directory) or computed on the fly as new - old."""

    def __init__(self, delta: Union[PathLike, tuple]):
        if isinstance(delta, (tuple, list)):
            if len(delta) != 2:
                raise DeltaError("extract_lora: delta must be a delta directory or a (new, old) pair of model directories")
            self.new, self.old = ModelFolder(delta[0], "new"), ModelFolder(delta[1], "old")
            check_compatible([self.new, self.old])
            self.layout = self.new
            self.base_name = str(self.old.root)
        else:
            self.new, self.old = ModelFolder(delta, "delta"), None
            if not self.new.is_delta:
                raise DeltaError(
                    f"{self.new.root}: not a delta checkpoint (manifest.json output 'delta'); "
                    f"pass a (new, old) pair of models instead"
                )
            self.layout = self.new
            inputs = (self.new.manifest or {}).get("inputs", {})
            self.base_name = inputs.get("b", {}).get("path", "")

    def inputs(self) -> list[ModelFolder]:
        return [self.new] + ([self.old] if self.old else [])

    def get(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        d = self.new.read(key).to(dtype)
        if self.old is not None:
            d = d - self.old.read(key).to(dtype)
        return d


def _targets(keys: list[str], targets) -> dict[str, str]:
    """{tensor key: module name} of the linear weights selected by `targets`."""
    if targets == "all-linear":
        wanted = set(LINEAR_NAMES)
    else:
        wanted = {targets} if isinstance(targets, str) else set(targets)
        unknown = sorted(wanted - set(LINEAR_NAMES))
        if unknown:
            raise DeltaError(f"targets: {unknown[0]!r} is not a decoder linear; expected some of {list(LINEAR_NAMES)}")
    out = {}
    for key in keys:
        m = _LINEAR.match(key)
        if m and m.group(2) in wanted:
            out[key] = m.group(1)
    if not out:
        raise DeltaError(f"targets={targets!r} matches no linear weight of the checkpoint")
    return out


def low_rank(d: torch.Tensor, r: int, method: str = "svd", niter: int = 4):
    """Rank-r factors of d (out, in): (B (out, r), A (r, in), kept singular values s_r)."""
    if method == "svd":
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    elif method == "randomized":
        # Halko et al.: close to optimal for fast-decaying spectra at a fraction of the cost.
        u, s, v = torch.svd_lowrank(d, q=min(r + 10, min(d.shape)), niter=niter)
        u, s, vh = u[:, :r], s[:r], v[:, :r].T
    else:
        raise DeltaError(f"method={method!r}: expected 'svd' or 'randomized'")
    root = s.sqrt()
    return u * root, root[:, None] * vh, s


def extract_lora(
    delta: Union[PathLike, tuple],
    r: int,
    out: PathLike,
    *,
    targets: Union[str, Sequence[str]] = "all-linear",
    dtype: Union[str, torch.dtype] = "float32",
    svd_dtype: Union[str, torch.dtype] = "float32",
    method: str = "svd",
    base_model_name_or_path: Optional[str] = None,
    overwrite: bool = False,
) -> Extraction:
    """Write a PEFT LoRA adapter whose B @ A is the best rank-r approximation of each linear delta.

    delta: a directory written by `diff` (chat - base, or a full fine-tune minus its base), or
    a (new, old) pair of model directories (the delta is computed tensor by tensor).
    targets: "all-linear" (q,k,v,o,gate,up,down of every layer) or a list of those names.
    r: the rank (at most min(out, in) of every target). method "svd" is exact; "randomized"
    (torch.svd_lowrank) is faster on 7B-sized matrices. The adapter has lora_alpha = r, so
    PEFT applies B @ A unscaled. Also writes extraction_report.json (per module and per layer
    retained energy, tensors a LoRA cannot hold).
    """
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise DeltaError(f"r={r!r}: expected a positive integer rank")
    src = _DeltaSource(delta)
    out = Path(out)
    check_output_path(out, src.inputs(), overwrite)
    store_dtype, work_dtype = dtype_from_name(dtype), dtype_from_name(svd_dtype)
    keys = src.layout.unique_keys()
    chosen = _targets(keys, targets)
    for key in chosen:
        shape = src.layout.info(key).shape
        if r > min(shape):
            raise DeltaError(f"r={r} exceeds min{tuple(shape)} of tensor {key!r}")

    result = Extraction(path=out, r=r)
    tensors: dict[str, torch.Tensor] = {}
    layer_tot: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])  # layer -> [kept s^2, total]
    for key in keys:
        d = src.get(key, work_dtype)
        if key not in chosen:
            norm = float(d.double().norm())
            if norm > 0:
                result.not_representable.append({"tensor": key, "norm": norm})
            continue
        module = chosen[key]
        b, a, s = low_rank(d, r, method)
        total = float(d.double().pow(2).sum())
        kept = float(s.double().pow(2).sum())
        # Eckart-Young: the error of the truncation is the norm of the discarded values.
        err = math.sqrt(max(total - kept, 0.0))
        result.modules.append({
            "module": module, "shape": list(d.shape), "retained_energy": kept / total if total > 0 else 1.0,
            "fro_error": err, "rel_error": err / math.sqrt(total) if total > 0 else 0.0,
        })
        layer = layer_index(key)
        layer_tot[layer][0] += kept
        layer_tot[layer][1] += total
        prefix = f"base_model.model.{module}"
        tensors[f"{prefix}.lora_A.weight"] = a.to(store_dtype).contiguous()
        tensors[f"{prefix}.lora_B.weight"] = b.to(store_dtype).contiguous()
    for layer in sorted(layer_tot):
        kept, total = layer_tot[layer]
        result.layers.append({
            "layer": layer, "retained_energy": kept / total if total > 0 else 1.0,
            "rel_error": math.sqrt(max(total - kept, 0.0) / total) if total > 0 else 0.0,
        })

    with atomic_directory(out, fsync=False) as tmp:
        entries = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
        writer = SafetensorsWriter(tmp / ADAPTER_WEIGHTS, entries, metadata={"format": "pt"}, fsync=True)
        try:
            for k, v in tensors.items():
                writer.write(k, v)
        finally:
            writer.close()
        write_json(tmp / ADAPTER_CONFIG, {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "auto_mapping": None,
            "base_model_name_or_path": base_model_name_or_path if base_model_name_or_path is not None else src.base_name,
            "revision": None, "r": r, "lora_alpha": r, "lora_dropout": 0.0,
            "target_modules": sorted({m.rsplit(".", 1)[-1] for m in chosen.values()}),
            "bias": "none", "use_rslora": False, "use_dora": False, "modules_to_save": None,
            "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
            "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        })
        write_json(tmp / REPORT, {
            "r": r, "method": method, "svd_dtype": dtype_name(work_dtype), "dtype": dtype_name(store_dtype),
            "layers": result.layers, "modules": result.modules, "not_representable": result.not_representable,
        })
    return result
