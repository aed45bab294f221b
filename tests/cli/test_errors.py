"""cli/errors.py: every error class of the library derives from fileio's QwenTuneError, and a
script's exit code follows its `bad_input` (2: the user's input, 1: a failure at run time)."""

from __future__ import annotations

import ast
import importlib
import signal
import sys
from pathlib import Path

import pytest

import _qwen_tune
from cli.errors import EXIT_FAILURE, EXIT_USAGE, run_main
from fileio.errors import QwenTuneError

ROOT = Path(__file__).resolve().parents[2]
# (module, class, bad_input): every error class a package raises on purpose.
ERRORS = [
    ("fileio.errors", "CheckpointError", True),
    ("models.qwen.errors", "ConfigError", True),
    ("models.qwen.chat_template", "ChatTemplateError", True),
    ("models.qwen.tokenizer.errors", "TokenizerError", True),
    ("models.qwen.export.errors", "ExportError", True),
    ("lora.config", "AdapterError", True),
    ("lora.delta.io", "DeltaError", True),
    ("data.errors", "DataError", True),
    ("train.report", "ReportError", True),
    ("train.guards", "NonFiniteError", False),
    ("train.guards", "NothingTrainsError", False),
    ("cli.errors", "UsageError", True),
    ("cli.errors", "RunFailure", False),
]
# Exceptions that are not errors shown to a user: a stop (exit 130/143), a watchdog's signal
# inside a render, the JSON parser's own error type (callers turn it into theirs).
NOT_USER_ERRORS = {"Interrupted", "RenderTimeout", "NestingError"}


def _instance(cls: type) -> BaseException:
    """An instance with the message 'boom' (bypassing constructors that build their message)."""
    error = cls.__new__(cls)
    Exception.__init__(error, "boom")
    return error


def test_every_exception_class_of_the_packages_is_listed():
    """An error class added to a package without the base (or without a row above) fails here."""
    listed = {name for _, name, _ in ERRORS} | NOT_USER_ERRORS | {"QwenTuneError"}
    for package in _qwen_tune.ORDER:
        for f in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.ClassDef) and any(
                        "Error" in ast.unparse(b) or "Exception" in ast.unparse(b) or "Failure" in ast.unparse(b)
                        for b in node.bases):
                    assert node.name in listed, f"{f.relative_to(ROOT)}: {node.name} is not in ERRORS"


@pytest.mark.parametrize("module, name, bad_input", ERRORS, ids=[e[1] for e in ERRORS])
def test_the_exit_code_follows_bad_input(module, name, bad_input, capsys, monkeypatch):
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, QwenTuneError) and cls.bad_input is bad_input

    def main():
        raise _instance(cls)

    monkeypatch.setattr(sys, "argv", ["tool.py"])
    handler = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as stop:
            run_main(main)
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert stop.value.code == (EXIT_USAGE if bad_input else EXIT_FAILURE)
    assert capsys.readouterr().err == f"tool.py: {'error' if bad_input else 'failed'}: boom\n"


def test_the_package_errors_keep_their_other_base():
    """`except ValueError` callers still catch the library's bad-input errors."""
    from data import DataError
    from lora import AdapterError
    from models.qwen import CheckpointError, ConfigError

    for cls in (DataError, AdapterError, CheckpointError, ConfigError):
        assert issubclass(cls, ValueError)
