"""Dynamic loss scaling for fp16 training (bf16 and fp32 do not need it).

    scaler = DynamicLossScaler(enabled=(dtype == "fp16"))
    (loss * scaler.scale).backward()
    ok = scaler.unscale_(params)     # grads /= scale; False if any grad is inf/NaN
    scaler.update(ok)                # halve on overflow, double after `growth_interval` clean steps

fp16's largest finite value is 65504: without scaling, small gradients underflow to 0, and
with a too-large scale they overflow. On overflow the step is skipped and the scale halved
(the usual behaviour, not an error); the state is plain JSON so a resume continues with the
same scale.
"""

from __future__ import annotations

from typing import Iterable

import torch


class DynamicLossScaler:
    """scale: current multiplier (1.0 when disabled). state_dict() -> JSON-ready dict."""

    def __init__(self, enabled: bool, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000, min_scale: float = 1.0):
        self.enabled = bool(enabled)
        self.scale = float(init_scale) if enabled else 1.0
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.min_scale = min_scale
        self.good_steps = 0
        self.overflows = 0

    @torch.no_grad()
    def unscale_(self, params: Iterable[torch.nn.Parameter]) -> bool:
        """Divide every gradient by the scale; True when all of them are finite."""
        grads = [p.grad for p in params if p.grad is not None]
        if self.enabled and self.scale != 1.0 and grads:
            torch._foreach_mul_(grads, 1.0 / self.scale)
        return all(bool(torch.isfinite(g).all()) for g in grads)

    def update(self, finite: bool) -> None:
        if not self.enabled:
            return
        if not finite:
            self.scale = max(self.min_scale, self.scale * self.backoff_factor)
            self.good_steps = 0
            self.overflows += 1
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0

    def state_dict(self) -> dict:
        return {"enabled": self.enabled, "scale": self.scale, "good_steps": self.good_steps, "overflows": self.overflows}

    def load_state_dict(self, state: dict) -> None:
        if bool(state.get("enabled")) != self.enabled:
            raise ValueError(
                f"loss scaler state is for enabled={state.get('enabled')}, this run has enabled={self.enabled} "
                "(was the checkpoint written with another --dtype?)"
            )
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])
        self.overflows = int(state.get("overflows", 0))
