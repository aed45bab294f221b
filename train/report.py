"""The evaluation report on disk: report.md (a table per model, notes, samples), report.json,
and loss_curves.png from the runs' metrics.jsonl (when matplotlib is importable). The numbers come
from train.evaluation."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable, Optional, Union

from fileio.errors import QwenTuneError
from fileio.safe_load import loads_json

PathLike = Union[str, os.PathLike]


class ReportError(QwenTuneError, ValueError):
    """Bad evaluation input: names the file, line, key or directory and what was expected."""


# ---------------------------------------------------------------------- rendering
def _fmt(x, spec: str = ".3f") -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return format(x, spec)


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:+.1f}%"


def render_markdown(report: dict) -> str:
    """The report as Markdown: one table with a row per model, then notes and samples."""
    s = report["settings"]
    lines = [
        "# Evaluation report",
        "",
        f"{report['created']} — reference row: **{report['reference']}**; perplexity windows of "
        f"{s['max_length']} tokens, stride {s['stride']}; greedy answers, at most {s['max_new_tokens']} new tokens.",
        "",
        "| model | domain ppl | Δ domain | general ppl | Δ general | forgetting | ROUGE-L | EM | F1 "
        "| avg len | stop <\\|im_end\\|> | ppl tokens/s |",
        "|---|---:|---:|---:|---:|:---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["models"]:
        g = r.get("generation", {})
        speeds = [r[p]["tokens_per_s"] for p in ("domain", "general") if p in r]
        flag = {True: "**yes**", False: "no", None: "–"}[r.get("forgetting")]
        lines.append(
            f"| {r['name']} | {_fmt(r.get('domain', {}).get('ppl'))} | {_pct(r.get('domain_ppl_change'))} "
            f"| {_fmt(r.get('general', {}).get('ppl'))} | {_pct(r.get('general_ppl_change'))} | {flag} "
            f"| {_fmt(g.get('rouge_l'))} | {_fmt(g.get('exact_match'))} | {_fmt(g.get('token_f1'))} "
            f"| {_fmt(g.get('avg_length'), '.1f')} | {_pct_plain(g.get('stop_rate'))} "
            f"| {_fmt(sum(speeds) / len(speeds) if speeds else None, ',.0f')} |"
        )
    first = report["models"][0] if report["models"] else {}
    sizes = [f"{part} text {first[part]['tokens']:,} tokens in {first[part]['documents']} documents"
             for part in ("domain", "general") if {"tokens", "documents"} <= set(first.get(part, {}))]
    if "generation" in first:
        sizes.append(f"{first['generation']['n']} instructions")
    lines += ["", "Δ = relative change against the reference row. Perplexity is token-weighted "
              "(exp of the mean token loss); ROUGE-L is character-level for Chinese references, word-level "
              "otherwise; EM and F1 use SQuAD normalisation; avg len in tokens."]
    if sizes:
        lines += ["", "Measured on: " + "; ".join(sizes) + "."]
    flagged = [r["name"] for r in report["models"] if r.get("forgetting")]
    thr = report["forgetting_threshold"]
    if flagged:
        lines += ["", f"**Forgetting:** general-text perplexity rose by more than {100 * thr:g}% over "
                  f"{report['reference']} for: {', '.join(flagged)}."]
    elif any(r.get("forgetting") is not None for r in report["models"]):
        lines += ["", f"Forgetting check: no model's general-text perplexity rose by more than {100 * thr:g}% "
                  f"over {report['reference']}."]
    lines.append("")
    for r in report["models"]:
        rows = [(k, r[k]) for k in ("model_dir", "adapter_dir", "quantize") if r.get(k)]
        lines.append(f"- **{r['name']}**: " + ", ".join(f"{k} `{v}`" for k, v in rows))
    if report.get("missing"):
        lines += ["", "## Missing stages", ""]
        lines += [f"- **{m['name']}**: {m['reason']}" for m in report["missing"]]
    data = report.get("data") or {}
    if data:
        lines += ["", "## Data", ""]
        lines += [f"- {k}: {v}" for k, v in data.items()]
    if report.get("plot"):
        lines += ["", "## Loss curves", "", f"![loss curves]({Path(report['plot']).name})"]
    elif report.get("loss_curves"):
        lines += ["", f"Loss curves: {report.get('plot_note') or 'no plot written'}."]
    samples = [(r["name"], r["generation"]["samples"]) for r in report["models"] if r.get("generation")]
    if samples and samples[0][1]:
        lines += ["", "## Sample answers", ""]
        for k, first in enumerate(samples[0][1]):
            lines += [f"**Q:** {_one_line(first['question'])}", "", f"- reference: {_one_line(first['reference'])}"]
            for name, ss in samples:
                if k < len(ss):
                    end = "" if ss[k]["stopped_at_im_end"] else " *(no <\\|im_end\\|>)*"
                    lines.append(f"- {name}: {_one_line(ss[k]['answer'])}{end}")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _pct_plain(x) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def write_report(report: dict, out_dir: PathLike) -> dict:
    """Write report.json, report.md and (matplotlib) loss_curves.png into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if report.get("loss_curves"):
        curves = {name: read_loss_curves(files) for name, files in report["loss_curves"].items()}
        plot = plot_loss_curves(curves, out / "loss_curves.png")
        report["plot"] = str(plot) if plot else None
        if plot is None:
            report["plot_note"] = "matplotlib is not installed, no plot written"
    paths = {"json": out / "report.json", "markdown": out / "report.md"}
    _atomic_write(paths["json"], json.dumps(report, indent=2, ensure_ascii=False, default=_json_default) + "\n")
    _atomic_write(paths["markdown"], render_markdown(report))
    if report.get("plot"):
        paths["plot"] = Path(report["plot"])
    return paths


def _json_default(x):
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------- loss curves
def read_loss_curves(files: Union[PathLike, Iterable[PathLike]]) -> dict:
    """Training and validation loss against step from metrics.jsonl file(s).

    A row with "step" and "loss" is a training point; "eval_loss" or "val_loss" (in the same
    or a separate row) is a validation point; a row with "split": "eval"/"val" and "loss" is
    a validation point too. Returns {"train": [(step, loss)], "eval": [(step, loss)]}.
    Lines that are not JSON objects are skipped (a run killed mid-write leaves one).
    """
    files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    train, evals = [], []
    for file in map(Path, files):
        if not file.is_file():
            continue
        for line in file.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = loads_json(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(row, dict) or not isinstance(row.get("step"), (int, float)):
                continue
            step = row["step"]
            is_eval = str(row.get("split", "")).lower() in ("eval", "val", "validation")
            if _finite(row.get("loss")):
                (evals if is_eval else train).append((step, float(row["loss"])))
            for key in ("eval_loss", "val_loss"):
                if _finite(row.get(key)):
                    evals.append((step, float(row[key])))
    return {"train": sorted(train), "eval": sorted(evals)}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def plot_loss_curves(curves: dict, out: PathLike) -> Optional[Path]:
    """Plot {name: {"train": [...], "eval": [...]}} into a PNG; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (name, c) in enumerate(curves.items()):
        color = f"C{i % 10}"
        if c["train"]:
            ax.plot(*zip(*c["train"]), color=color, lw=1.2, label=f"{name} train")
        if c["eval"]:
            ax.plot(*zip(*c["eval"]), color=color, ls="--", marker="o", ms=3, label=f"{name} validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
