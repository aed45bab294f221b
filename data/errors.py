"""Bad-input handling shared by the data modules: one error type, and a counter for skips.

Every problem names where it is (``file:line``, the field) and what was expected. By default
it raises `DataError`; with ``on_error="skip"`` the record is skipped and counted in an
`InputReport`, whose summary the caller prints — nothing is dropped silently.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List

from fileio.errors import QwenTuneError
ON_ERROR = ("raise", "skip")


class DataError(QwenTuneError, ValueError):
    """Bad training data: names the file, line and field, and what was expected.

    reason: a short category ("malformed-json", "missing-field", "not-utf8", "empty",
    "bad-roles", "too-long", ...), used to count skips.
    """

    def __init__(self, message: str, reason: str = "invalid"):
        super().__init__(message)
        self.reason = reason


def check_on_error(on_error: str) -> str:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    return on_error


@dataclass
class InputReport:
    """What happened to the input: records read, kept, skipped (by reason) and truncated."""

    read: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: Dict[str, List[str]] = field(default_factory=dict)
    truncated: Counter = field(default_factory=Counter)  # e.g. history-dropped, prompt-truncated

    def skip(self, err: DataError) -> None:
        self.skipped[err.reason] += 1
        self.examples.setdefault(err.reason, [])
        if len(self.examples[err.reason]) < 3:
            self.examples[err.reason].append(str(err))

    def handle(self, err: DataError, on_error: str) -> None:
        """Raise `err` (on_error="raise") or count it as skipped."""
        if on_error == "raise":
            raise err
        self.skip(err)

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def merge(self, other: "InputReport") -> "InputReport":
        self.read += other.read
        self.kept += other.kept
        self.skipped.update(other.skipped)
        self.truncated.update(other.truncated)
        for k, v in other.examples.items():
            self.examples.setdefault(k, []).extend(v[: 3 - len(self.examples[k])])
        return self

    def summary(self) -> str:
        parts = [f"read {self.read}", f"kept {self.kept}"]
        if self.truncated:
            parts.append("truncated " + ", ".join(f"{k}: {v}" for k, v in sorted(self.truncated.items())))
        if self.skipped:
            parts.append("skipped " + ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())))
            first = [e[0] for e in self.examples.values() if e]
            parts.append("first: " + first[0])
        return "; ".join(parts)

    def as_dict(self) -> dict:
        return {"read": self.read, "kept": self.kept, "skipped": dict(self.skipped), "truncated": dict(self.truncated)}
