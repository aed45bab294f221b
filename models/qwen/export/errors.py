"""The error of the export package."""

from fileio.errors import QwenTuneError


class ExportError(QwenTuneError, ValueError):
    """A model directory that cannot be exported as it is (names the file, tensor or key)."""
