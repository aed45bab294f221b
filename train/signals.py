"""Stopping a run on SIGINT / SIGTERM: finish the step, save a checkpoint, write nothing final.

    with StopSignals() as stop:
        while ... and not stop.requested: train_step()
    if stop.requested: save_checkpoint(); raise Interrupted(stop.requested, step, total, checkpoint)

A second signal means "now": `Interrupted` is raised at once, from wherever the loop is (the last
complete checkpoint stays valid, since checkpoints are written atomically).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Optional, Union

SIGNALS = ("SIGINT", "SIGTERM")


class Interrupted(Exception):
    """The run was stopped by a signal. checkpoint: the complete checkpoint to resume from (None
    when training had not started); the command-line layer exits 130 (SIGINT) or 143 (SIGTERM)."""

    def __init__(self, signal_name: str, step: Optional[int] = None, total_steps: Optional[int] = None,
                 checkpoint: Optional[Union[str, Path]] = None):
        self.signal = signal_name if signal_name in SIGNALS else "SIGINT"
        self.step, self.total_steps = step, total_steps
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        super().__init__(self.describe())

    def describe(self) -> str:
        when = "" if self.step is None else f" after step {self.step}" + (
            f" of {self.total_steps}" if self.total_steps else "")
        if self.checkpoint is None:
            return f"stopped by {self.signal}{when}; no checkpoint to resume from, nothing final was written"
        return f"stopped by {self.signal}{when}; checkpoint {self.checkpoint} saved, nothing final was written"


class StopSignals:
    """While active, SIGINT/SIGTERM set `requested` (the signal's name) instead of killing the
    process; the handlers in place before are restored on exit. Only the main thread can catch
    signals: elsewhere this does nothing."""

    def __init__(self):
        self.requested: Optional[str] = None
        self._old: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for name in SIGNALS:
                sig = getattr(signal, name)
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:
            raise Interrupted(name)
        self.requested = name

    def __exit__(self, *exc) -> bool:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False
