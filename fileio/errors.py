"""The one base of every error the library raises on purpose, and the error of a file that
cannot be loaded as it is.

    class DataError(QwenTuneError, ValueError): ...      # keeps ValueError for `except ValueError`
    class RunFailure(QwenTuneError): bad_input = False   # a failure at run time, not the input

A script's error boundary (cli/errors.py) reads `bad_input`: True (the default) is the user's
input or a refusal, exit code 2; False is a failure at run time, exit code 1.
"""


class QwenTuneError(Exception):
    """An error of this library that is printed as one line (no traceback)."""

    bad_input: bool = True   # True: the user's input (exit 2); False: a run-time failure (exit 1)


class CheckpointError(QwenTuneError, ValueError):
    """A checkpoint (model, adapter, training state) that cannot be loaded as it is: names the
    file and the tensor or key."""
