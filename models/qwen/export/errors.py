"""The error of the export package."""


class ExportError(ValueError):
    """A model directory that cannot be exported as it is (names the file, tensor or key)."""
