"""Delta report: how much each layer moved, ||new - old|| / ||old|| per layer and module group.

Norms are accumulated in float64 over row chunks, so memory stays at one chunk per input.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from .combine import DEFAULT_CHUNK_BYTES, check_compatible
from .groups import GROUPS, layer_index, module_group
from .io import DeltaError, ModelFolder, PathLike


@dataclass
class DeltaReport:
    """Per-tensor rows (tensor, layer, group, delta_norm, weight_norm, rel) and their aggregates."""

    new: str
    old: str
    tensors: list[dict] = field(default_factory=list)

    def by_layer(self) -> list[dict]:
        """One row per decoder layer (then 'embeddings' and 'final'): rel change per group and in total.

        rel = sqrt(sum ||delta||^2) / sqrt(sum ||W||^2) over the tensors of the cell.
        """
        cells: dict = defaultdict(lambda: defaultdict(lambda: [0.0, 0.0]))
        for t in self.tensors:
            row = t["layer"] if t["layer"] is not None else ("embeddings" if t["group"] == "embeddings" else "final")
            for col in (t["group"], "total"):
                cells[row][col][0] += t["delta_norm"] ** 2
                cells[row][col][1] += t["weight_norm"] ** 2
        order = sorted(k for k in cells if isinstance(k, int)) + [k for k in ("embeddings", "final") if k in cells]
        out = []
        for row in order:
            rec = {"layer": row}
            for col in GROUPS + ("total",):
                if col not in cells[row]:
                    rec[col] = None
                    continue
                d2, w2 = cells[row][col]
                rec[col] = math.sqrt(d2) / math.sqrt(w2) if w2 > 0 else (0.0 if d2 == 0 else math.inf)
            out.append(rec)
        return out

    def table(self) -> str:
        """The per-layer table as text (relative change, '-' where a group has no tensor)."""
        cols = GROUPS + ("total",)
        lines = [f"relative change ||new - old|| / ||old||: new={self.new} old={self.old}",
                 f"{'layer':>10}" + "".join(f"{c:>12}" for c in cols)]
        for rec in self.by_layer():
            cells = "".join(f"{'-':>12}" if rec[c] is None else f"{rec[c]:>12.3e}" for c in cols)
            lines.append(f"{str(rec['layer']):>10}{cells}")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps({"new": self.new, "old": self.old, "layers": self.by_layer(), "tensors": self.tensors}, indent=2)

    def plot(self, path: PathLike) -> Path:
        """Write a PNG of the relative change per layer and group (needs matplotlib)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise DeltaError("delta report plot: matplotlib is not installed (pip install matplotlib)") from None
        rows = [r for r in self.by_layer() if isinstance(r["layer"], int)]
        fig, ax = plt.subplots(figsize=(8, 4))
        for group in ("attention", "mlp", "norms"):
            pts = [(r["layer"], r[group]) for r in rows if r[group] is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=group)
        ax.set_xlabel("layer")
        ax.set_ylabel("||delta|| / ||W||")
        ax.set_yscale("log")
        ax.legend()
        ax.set_title("relative weight change per layer")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return Path(path)


def delta_report(new: Union[PathLike, ModelFolder], old: PathLike, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> DeltaReport:
    """Relative change of every tensor of `new` with respect to `old` (a model).

    `new` may be a model (delta = new - old) or a delta directory written by `diff`
    (delta = its tensors, with `old` the model it is relative to, e.g. the base).
    """
    cn, co = ModelFolder(new, "new"), ModelFolder(old, "old")
    if co.is_delta:
        raise DeltaError(f"{co.root} (old): is a delta; the reference must be a model")
    check_compatible([cn, co])
    rep = DeltaReport(new=str(cn.root), old=str(co.root))
    for key in co.unique_keys():
        info = co.info(key)
        rows = info.shape[0] if info.shape else 1
        row_numel = max(1, info.numel // max(rows, 1))
        step = max(1, chunk_bytes // (8 * row_numel))
        d2 = w2 = 0.0
        for r0 in range(0, rows, step):
            sl = (r0, min(rows, r0 + step)) if info.shape else (None, None)
            w = co.read(key, *sl).double()
            n = cn.read(key, *sl).double()
            d = n if cn.is_delta else n - w
            d2 += float(d.pow(2).sum())
            w2 += float(w.pow(2).sum())
        rep.tensors.append({
            "tensor": key, "layer": layer_index(key), "group": module_group(key),
            "delta_norm": math.sqrt(d2), "weight_norm": math.sqrt(w2),
            "rel": math.sqrt(d2) / math.sqrt(w2) if w2 > 0 else (0.0 if d2 == 0 else math.inf),
        })
    return rep
