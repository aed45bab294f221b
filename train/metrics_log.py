"""Where a run reports its numbers: metrics.jsonl, TensorBoard, and progress on the terminal.

    log = MetricsLog(out / "metrics.jsonl", tensorboard_dir=out / "runs")   # rank 0 only
    log.trim(resumed_step)            # resume: drop rows past the restored step (fresh run: empty it)
    log.append({"step": 3, "loss": 2.1, ...})
    progress = Progress(total=400, initial=0, mode="auto", every=20)   # a bar on a terminal, else lines
    progress.update(stats)
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

from fileio.safe_load import loads_json

from .tensorboard import EventWriter

# metrics.jsonl key -> TensorBoard tag (the HF Trainer's names)
TENSORBOARD_TAGS = {"loss": "train/loss", "lr": "train/learning_rate", "grad_norm": "train/grad_norm",
                    "tokens_per_s": "train/tokens_per_second", "val_loss": "eval/loss", "val_ppl": "eval/perplexity"}
HELD_OUT = "val_"   # metrics.jsonl's prefix of a held-out metric


def tensorboard_tag(key: str) -> str:
    """The TensorBoard tag of a metrics.jsonl key that names its group ("rewards/chosen"): TRL's,
    under the HF Trainer's train/ or eval/ prefix (held-out "val_rewards/chosen" -> "eval/rewards/chosen")."""
    return f"eval/{key[len(HELD_OUT):]}" if key.startswith(HELD_OUT) else f"train/{key}"


class MetricsLog:
    """metrics.jsonl (one JSON object per line) and, optionally, TensorBoard event files."""

    def __init__(self, path: Path, tensorboard_dir: Optional[Path] = None):
        self.path = Path(path)
        self.tensorboard_dir = tensorboard_dir
        self._tb: Optional[EventWriter] = None

    def trim(self, keep_through: Optional[int]) -> None:
        """Fresh run (None): empty the file. Resume: drop rows past `keep_through` (and a line cut
        by the crash), so the file reads as the run that was never interrupted."""
        if not self.path.exists():
            return
        if keep_through is None:
            self.path.write_text("")
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = loads_json(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and row.get("step", 0) <= keep_through:
                keep.append(line)
        self.path.write_text("".join(line + "\n" for line in keep))

    def append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, allow_nan=True) + "\n")
        if self.tensorboard_dir is not None:
            if self._tb is None:
                self._tb = EventWriter(self.tensorboard_dir)
            values = {tag: row[key] for key, tag in TENSORBOARD_TAGS.items()
                      if isinstance(row.get(key), (int, float)) and math.isfinite(row[key])}
            values.update({tensorboard_tag(k): v for k, v in row.items() if "/" in k and isinstance(v, (int, float))})
            self._tb.scalars(int(row.get("step", 0)), values)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class Progress:
    """A tqdm bar on a terminal; without one (nohup, `| tee`, CI) a line every `every` steps:
    step, loss, lr, tokens/s and the time left, as the HF Trainer logs."""

    def __init__(self, total: int, initial: int = 0, mode: str = "auto", every: Optional[int] = None):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode, self.total, self.initial = mode, total, initial
        self.every = every or max(1, math.ceil(total / 20))
        self.t0 = time.perf_counter()
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def update(self, stats: dict[str, Any]) -> None:
        step = stats["step"]
        loss = f"{stats['loss']:.4f}" if stats.get("loss") is not None else "skipped"
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=loss, lr=f"{stats['lr']:.2e}")
        elif self.mode == "lines" and (step % self.every == 0 or step == self.total):
            done = step - self.initial
            elapsed = time.perf_counter() - self.t0
            eta = elapsed / max(done, 1) * (self.total - step)
            print(f"step {step}/{self.total}  loss {loss}  lr {stats['lr']:.3g}  "
                  f"{stats.get('tokens_per_s', 0):.0f} tokens/s  elapsed {_clock(elapsed)}  eta {_clock(eta)}",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"
