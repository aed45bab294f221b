"""Learning-rate schedule: linear warm-up from 0, then half a cosine down to min_lr.

    lr = cosine_warmup(step, warmup=resolve_warmup(total, ratio=0.03), total=1000, peak_lr=2e-4)

A pure function of the step (nanoGPT's get_lr): resuming at step s gives the same lr as an
uninterrupted run at step s without any scheduler state. `step` counts optimizer steps
already taken, so the first update uses step 0. The values are those of HF's
get_{cosine,linear,constant}_schedule_with_warmup (what the HF Trainer, and so LLaMA-Factory
and TRL, run): the warm-up is peak_lr * step / warmup, so with any warm-up the first update
is at lr 0 (it still fills AdamW's moments), and peak_lr is reached at step `warmup`, where
the decay begins.
"""

from __future__ import annotations

import math
from typing import Optional


def cosine_warmup(step: int, *, warmup: int, total: int, peak_lr: float, min_lr: float = 0.0) -> float:
    """lr for optimizer step `step` (0-based) of `total`.

    Warm-up (step < warmup): peak_lr * step / warmup, linear from 0 at the first update.
    Decay (warmup <= step <= total): min_lr + (peak_lr - min_lr) * (1 + cos(pi * p)) / 2 with
    p = (step - warmup) / (total - warmup); steps past `total` stay at min_lr.
    """
    if total <= 0:
        raise ValueError(f"cosine_warmup: total must be > 0 steps, got {total}")
    if not 0 <= warmup <= total:
        raise ValueError(f"cosine_warmup: warmup must be in [0, total={total}], got {warmup}")
    if step < 0:
        raise ValueError(f"cosine_warmup: step must be >= 0, got {step}")
    if min_lr > peak_lr:
        raise ValueError(f"cosine_warmup: min_lr={min_lr} is above peak_lr={peak_lr}")
    if step < warmup:
        return _warmup(step, warmup, peak_lr)
    if step >= total or total == warmup:
        return min_lr if step >= total else peak_lr
    progress = (step - warmup) / (total - warmup)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _warmup(step: int, warmup: int, peak_lr: float) -> float:
    """HF's warm-up line: 0 at the first update (step 0), peak_lr at step `warmup`."""
    return peak_lr * step / warmup


SCHEDULES = ("cosine", "linear", "constant", "constant_with_warmup")


def learning_rate(step: int, *, schedule: str = "cosine", warmup: int, total: int, peak_lr: float,
                  min_lr: float = 0.0) -> float:
    """lr for optimizer step `step` under one of the HF Trainer's schedules (`lr_scheduler_type`).

    cosine: `cosine_warmup`. linear: the same warm-up, then a straight line from peak_lr at
    `warmup` to min_lr at `total`. constant_with_warmup: the warm-up, then peak_lr. constant:
    peak_lr from the first step (HF's constant schedule has no warm-up).
    """
    if schedule == "cosine":
        return cosine_warmup(step, warmup=warmup, total=total, peak_lr=peak_lr, min_lr=min_lr)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "constant":
        return peak_lr
    cosine_warmup(step, warmup=warmup, total=total, peak_lr=peak_lr, min_lr=min_lr)   # the same argument checks
    if step < warmup:
        return _warmup(step, warmup, peak_lr)
    if schedule == "constant_with_warmup":
        return peak_lr
    if step >= total or total == warmup:
        return min_lr if step >= total else peak_lr
    return peak_lr - (peak_lr - min_lr) * (step - warmup) / (total - warmup)


def resolve_warmup(total: int, steps: Optional[int] = None, ratio: Optional[float] = None) -> int:
    """Warm-up length in steps from either `steps` or `ratio` of `total` (ceil); 0 if neither."""
    if steps is not None and ratio is not None:
        raise ValueError(f"give warmup_steps ({steps}) or warmup_ratio ({ratio}), not both")
    if steps is not None:
        if not isinstance(steps, int) or isinstance(steps, bool) or not 0 <= steps <= total:
            raise ValueError(f"warmup_steps must be an int in [0, total steps={total}], got {steps!r}")
        return steps
    if ratio is not None:
        if not 0.0 <= float(ratio) <= 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1], got {ratio!r}")
        return min(total, math.ceil(float(ratio) * total))
    return 0
