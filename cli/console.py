"""What the stage scripts print: log lines, loss curves, output listings, streamed generation."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from fileio.safe_load import loads_json
from models.qwen import CHAT_STOP_IDS


def log(msg: str = "") -> None:
    print(msg, flush=True)


def note(msg: str) -> None:
    """A warning the user should see even with stdout redirected (stderr, one line)."""
    print(f"{Path(sys.argv[0]).name}: note: {msg}", file=sys.stderr, flush=True)


class Timer:
    """Wall-clock seconds since creation; str() gives "12.3s"."""

    def __init__(self):
        self.t0 = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def __str__(self) -> str:
        return f"{self.seconds:.1f}s"


# ---------------------------------------------------------------------- generation
class TextStream:
    """Incremental detokenisation: prints only complete UTF-8 text (byte-level BPE can split
    a character over tokens, which would decode to U+FFFD until the rest arrives)."""

    def __init__(self, tok, write: Optional[Callable[[str], None]] = None, stop_ids: Sequence[int] = ()):
        self.tok = tok
        self.ids: list[int] = []
        self.printed = 0
        self.stop = set(stop_ids)
        self.done = False
        self.write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))

    def __call__(self, new: torch.Tensor) -> None:
        tid = int(new.reshape(-1)[0])
        if self.done or tid in self.stop:
            self.done = True
            return
        self.ids.append(tid)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self.write(text[self.printed:])
        self.printed = len(text)

    def text(self) -> str:
        return self.tok.decode(self.ids)


def generate_text(model, tok, prompt_ids: list[int], *, max_new_tokens: int, temperature: float = 0.0,
                  top_k: int = 0, top_p: float = 1.0, stop_ids: Sequence[int] = CHAT_STOP_IDS, seed: int = 0,
                  stream: bool = True, write=None) -> str:
    """Generate after `prompt_ids`, streaming text as it comes; returns the new text."""
    from models.qwen import generate

    ids = torch.tensor([prompt_ids], dtype=torch.long, device=model.device)
    streamer = TextStream(tok, write=write if stream else (lambda s: None), stop_ids=stop_ids)
    gen = torch.Generator(device=model.device).manual_seed(seed)
    generate(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
             eos_ids=list(stop_ids), generator=gen, stream=streamer)
    return streamer.text()


def chat_ids(tok, question: str, system: Optional[str] = None, template_kwargs: Optional[dict] = None) -> list[int]:
    """A one-question conversation rendered with the tokenizer's chat template (and its variables
    `template_kwargs`, e.g. --chat-template-kwargs), ready to answer."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **(template_kwargs or {})))


# ---------------------------------------------------------------------- metrics
def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl (a line cut by a crash is skipped)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(loads_json(line))
            except json.JSONDecodeError:
                continue
    return rows


def loss_curve(rows: list[dict], width: int = 50, height: int = 10) -> str:
    """An ASCII plot of training loss against step (from metrics.jsonl rows)."""
    pts = [(r["step"], r["loss"]) for r in rows if "loss" in r and "step" in r and r["loss"] is not None
           and math.isfinite(r["loss"])]
    if not pts:
        return "(no training loss logged)"
    steps = [s for s, _ in pts]
    losses = [l for _, l in pts]
    lo, hi = min(losses), max(losses)
    span = max(hi - lo, 1e-9)
    s0, s1 = min(steps), max(steps)
    grid = [[" "] * width for _ in range(height)]
    for s, l in pts:
        x = 0 if s1 == s0 else round((s - s0) / (s1 - s0) * (width - 1))
        y = round((hi - l) / span * (height - 1))
        grid[y][x] = "*"
    lines = []
    for i, row in enumerate(grid):
        label = hi - span * i / (height - 1)
        lines.append(f"{label:8.3f} |{''.join(row)}")
    lines.append(" " * 9 + "+" + "-" * width)
    lines.append(" " * 10 + f"step {s0}".ljust(width - 10) + f"step {s1}")
    return "\n".join(lines)


def loss_table(rows: list[dict], every: int = 1) -> str:
    out = []
    for r in rows:
        if "loss" not in r or r.get("step") is None or r["step"] % every:
            continue
        extra = "".join(f"  {k} {r[k]:.3g}" for k in ("lr", "grad_norm", "tokens_per_s") if isinstance(r.get(k), (int, float)))
        out.append(f"  step {r['step']:>5}  loss {r['loss']:.4f}{extra}")
    evals = [r for r in rows if isinstance(r.get("val_loss"), (int, float))]
    if evals:
        out.append("  held-out loss by step: " + ", ".join(f"{r['step']}: {r['val_loss']:.4f}" for r in evals))
    return "\n".join(out)


def print_training_curve(out: Path, loss_name: str) -> None:
    """The run's loss curve and table, from out/metrics.jsonl."""
    rows = read_metrics(out / "metrics.jsonl")
    log(f"\nloss curve ({loss_name} per optimizer step):")
    log(loss_curve(rows))
    log(loss_table(rows, every=max(1, len(rows) // 10)))


def list_outputs(out: Path) -> str:
    """Every file under `out` (checkpoints summarised), with sizes."""
    from train import distributed

    if not distributed.is_main():   # rank 0 may be writing there; only its report is printed
        return ""
    lines = []
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out)
        if not p.is_file() or rel.name.startswith("."):
            continue
        if rel.parts[0] == "checkpoints" and len(rel.parts) > 2:
            continue
        lines.append(f"  {out / rel}  ({_size(p.stat().st_size)})")
    ck = out / "checkpoints"
    if ck.is_dir():
        for d in sorted(x for x in ck.iterdir() if x.is_dir() and not x.name.startswith(".")):
            size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
            lines.append(f"  {d}/  (checkpoint, {_size(size)})")
    return "\n".join(lines)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
