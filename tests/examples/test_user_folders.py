"""A user's project folder cannot hide our packages (issue 30, item 3).

Each check runs Python in a subprocess from inside a user's project, without PYTHONPATH, the way
a user does after installing: `pip install -e .` (the README's install, and CI's: the
interpreter running these tests) and a normal `pip install .` (built here into a folder that
stands in for site-packages). Two projects:

- LLaMA-Factory's layout: `data/` with dataset_info.json and a .jsonl, and `train/`, `models/`,
  `cli/`, `examples/` folders, none with __init__.py. Before the fix, the editable install's
  finder came after Python's own, so `import train` got the user's empty `train/` namespace and
  `python -m examples sft` failed with "cannot import name ... from 'data' (unknown location)".
- A project with its own `train.py`, `data/__init__.py` and `models.py` (Python modules, which
  come first on sys.path): our scripts and `import lora` still use ours; a user script that has
  imported its own `train` and then needs ours gets one ImportError line naming the file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OURS = ("fileio", "models", "quant", "lora", "data", "train", "cli", "demo", "examples")
# What a normal install is built from (setup.cfg's packages and py_modules, and the files it reads).
SOURCES = (*OURS, "_qwen_tune.py", "setup.cfg", "pyproject.toml", "README.md")


class Install:
    """Where our packages are installed, and how to run Python so that it sees only that install."""

    def __init__(self, site: Path, env: dict, console: list[str], stale: str = ""):
        self.site, self.env, self.console, self.stale = site, env, console, stale

    def python(self, *args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
        return self.run([sys.executable, *args], cwd=cwd, timeout=timeout)

    def run(self, argv: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
        return subprocess.run(argv, cwd=cwd, env=self.env, capture_output=True, text=True, timeout=timeout)


def _bare_env(pythonpath: str | None = None) -> dict:
    """The user's environment: no PYTHONPATH of the test run's (only `pythonpath`, if given)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return env


def _editable(tmp: Path) -> Install:
    env = _bare_env()
    probe = "import json, os, sys, lora; print(json.dumps([os.path.dirname(lora.__path__[0]), sys.path]))"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp, env=env, capture_output=True, text=True, timeout=120)
    if proc.returncode:
        pytest.skip("qwen-tune is not installed in this interpreter (pip install -e .)")
    site, path = json.loads(proc.stdout)
    if Path(site).resolve() != ROOT:
        pytest.skip(f"qwen-tune is installed from {site}, not from this checkout (pip install -e . here)")
    stale = "" if any(p and Path(p).resolve() == ROOT for p in path) else (  # the hint on a failure
        "this checkout is not on sys.path: an editable install from before setup.cfg's package_dir "
        "(setuptools' finder, behind Python's own)? run `pip install -e .` again")
    script = Path(sys.executable).parent / "qwen-tune"
    console = [str(script)] if script.exists() else [sys.executable, "-c", "from examples.__main__ import main; main()"]
    return Install(ROOT, env, console, stale)


def _wheel(tmp: Path) -> Install:
    """`pip install .` into a folder, which then plays site-packages (it comes after the project's)."""
    src, site = tmp / "src", tmp / "site-packages"
    for name in SOURCES:  # built from a copy: a build writes build/ and *.egg-info beside its sources
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    # This interpreter's setuptools if it can build a wheel (bdist_wheel: setuptools >= 70.1, or the
    # wheel package), else pip's isolated build, as a user's `pip install .` does.
    can_build = ("import importlib.util as u; "
                 "assert u.find_spec('setuptools') and (u.find_spec('setuptools.command.bdist_wheel') or u.find_spec('wheel'))")
    local = subprocess.run([sys.executable, "-c", can_build], capture_output=True).returncode == 0
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(src),
                           *(["--no-build-isolation"] if local else [])], capture_output=True, text=True, timeout=300)
    if proc.returncode and not local and "No matching distribution" in proc.stderr:
        pytest.skip("no setuptools to build the package with: none here that builds wheels, and no package index")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Install(site, _bare_env(str(site)), [str(site / "bin" / "qwen-tune")])


@pytest.fixture(scope="module", params=["editable", pytest.param("wheel", marks=pytest.mark.slow)])
def install(request, tmp_path_factory) -> Install:
    tmp = tmp_path_factory.mktemp(f"install-{request.param}")
    return _editable(tmp) if request.param == "editable" else _wheel(tmp)


@pytest.fixture(scope="module")
def llamafactory_project(tmp_path_factory) -> Path:
    """LLaMA-Factory's `dataset_dir: data` layout, with folders named like our other packages."""
    proj = tmp_path_factory.mktemp("llamafactory-project")
    (proj / "data").mkdir()
    (proj / "data" / "dataset_info.json").write_text(json.dumps({"mine": {"file_name": "mine.jsonl"}}))
    (proj / "data" / "mine.jsonl").write_text(json.dumps({"instruction": "Say hi.", "input": "", "output": "hi"}) + "\n")
    for folder, file in (("train", "run.sh"), ("models", "README.md"), ("cli", "notes.txt"),
                         ("examples", "qwen_lora_sft.yaml")):
        (proj / folder).mkdir()
        (proj / folder / file).write_text("# the user's own\n")
    return proj


@pytest.fixture(scope="module")
def own_modules_project(tmp_path_factory) -> Path:
    """A project whose own Python modules are named like ours (and folders like llamafactory_project's)."""
    proj = tmp_path_factory.mktemp("own-modules-project")
    (proj / "train.py").write_text("MINE = 'train.py'\n")
    (proj / "models.py").write_text("MINE = 'models.py'\n")
    (proj / "data").mkdir()
    (proj / "data" / "__init__.py").write_text("MINE = 'data'\n")
    (proj / "cli").mkdir()
    (proj / "examples").mkdir()
    return proj


INJECT = ("import lora, torch; m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)); "
          "lora.inject(m, r=16); print('injected', type(m[0]).__name__)")


def _ok(proc: subprocess.CompletedProcess, hint: str = "") -> str:
    assert proc.returncode == 0, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:], hint)
    return proc.stdout


def test_namespace_folders_do_not_hide_ours(install, llamafactory_project):
    # `import train` first in the process: the import that failed before any of ours had run.
    code = ("import json, train, data, models, cli, examples; "
            "print(json.dumps({m.__name__: m.__file__ for m in (train, data, models, cli, examples)})); " + INJECT)
    out = _ok(install.python("-c", code, cwd=llamafactory_project), install.stale)
    files = json.loads(out.splitlines()[0])
    for name, file in files.items():
        assert file and Path(file).resolve() == (install.site / name / "__init__.py").resolve(), (name, file, install.stale)
    assert "injected LoRALinear" in out


def test_python_m_examples_in_llamafactory_layout(install, llamafactory_project):
    out = _ok(install.python("-m", "examples", "sft", "--help", cwd=llamafactory_project), install.stale)
    assert "--data" in out


@pytest.mark.parametrize("entry", ["python -m examples", "python examples/sft.py", "qwen-tune"])
def test_scripts_ignore_the_users_own_modules(install, own_modules_project, entry):
    if entry == "python -m examples":
        proc = install.python("-m", "examples", "sft", "--help", cwd=own_modules_project)
    elif entry == "qwen-tune":
        proc = install.run([*install.console, "sft", "--help"], cwd=own_modules_project)
    else:
        proc = install.python(str(install.site / "examples" / "sft.py"), "--help", cwd=own_modules_project)
    assert "--data" in _ok(proc)


def test_users_own_train_stays_theirs_and_a_clash_is_one_line(install, own_modules_project):
    # lora needs models: ours, though the user's models.py comes first on sys.path. The user's
    # `import train` is their train.py (it is their project); cli needs ours -> one named error.
    proc = install.python("-c", INJECT + "; import train; print('theirs', train.MINE); import cli",
                          cwd=own_modules_project)
    assert "injected LoRALinear" in proc.stdout and "theirs train.py" in proc.stdout, (proc.stdout, proc.stderr)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: qwen-tune's 'cli' needs its own package 'train'"), proc.stderr
    assert str(own_modules_project / "train.py") in last and "rename" in last, last
