"""The tokenizer package's one error type."""

from __future__ import annotations

from fileio.errors import QwenTuneError

class TokenizerError(QwenTuneError, ValueError):
    """Tokenizer files or tokens that cannot be used (names the file, line or key and what was expected)."""
