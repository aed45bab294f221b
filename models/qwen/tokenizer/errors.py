"""The tokenizer package's one error type."""

from __future__ import annotations


class TokenizerError(ValueError):
    """Tokenizer files or tokens that cannot be used (names the file, line or key and what was expected)."""
