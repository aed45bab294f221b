"""Fixtures for the example-script tests: run a script in a subprocess, tiny checkpoints."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import child_threads

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def run_script(name: str, *args: str, cwd=None, cache=None, timeout: int = 300) -> subprocess.CompletedProcess:
    """python examples/<name> args... in a subprocess (the tests' thread count, isolated cache root)."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = child_threads()
    env["PYTHONUNBUFFERED"] = "1"
    if cache is not None:
        env["QWEN_TUNE_CACHE"] = str(cache)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *map(str, args)],
        cwd=cwd or ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )


def tree_digest(path: Path) -> dict:
    """{relative path: sha256} of every file under `path` (to prove nothing was touched)."""
    out = {}
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            out[str(p.relative_to(path))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_usage_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 2, exactly one line on stderr, no traceback, and the line names `needles`."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture
def script():
    return run_script
