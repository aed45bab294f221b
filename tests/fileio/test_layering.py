"""The layering the packages promise, read from their source (ast): fileio is the only reader and
writer of safetensors files and imports none of our other packages, and models/qwen knows nothing
of LoRA (no name, attribute or matched string of it; docstrings and error messages may name it
as the remedy)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import _qwen_tune

ROOT = Path(__file__).resolve().parents[2]


def _modules(package: str) -> list[Path]:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, package
    return files


def _imported(tree: ast.AST) -> set[str]:
    """Top-level names of every absolute import in a module (lazy ones inside functions too)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", [p for p in _qwen_tune.ORDER if p != "fileio"])
def test_only_fileio_imports_safetensors(package):
    users = [f.relative_to(ROOT) for f in _modules(package) if "safetensors" in _imported(ast.parse(f.read_text()))]
    assert not users, f"{users}: read and write safetensors files through fileio.safetensors_file"


def test_fileio_imports_none_of_our_other_packages():
    ours = set(_qwen_tune.ORDER) - {"fileio"}
    for f in _modules("fileio"):
        found = _imported(ast.parse(f.read_text())) & ours
        assert not found, f"{f.relative_to(ROOT)} imports {sorted(found)}: fileio is the lowest layer"


def _prose(tree: ast.AST) -> set[int]:
    """ids of the string constants that are prose: docstrings and the messages of raised errors."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
        if isinstance(node, ast.Raise):
            ids.update(id(n) for n in ast.walk(node) if isinstance(n, ast.Constant))
    return ids


def _words(tree: ast.AST) -> list[str]:
    """Every identifier (names, attributes, definitions, arguments, imports, keywords) and every
    string constant that is not prose."""
    prose, out = _prose(tree), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            out.append(node.id)
        elif isinstance(node, ast.Attribute):
            out.append(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.append(node.name)
        elif isinstance(node, ast.arg):
            out.append(node.arg)
        elif isinstance(node, ast.keyword) and node.arg:
            out.append(node.arg)
        elif isinstance(node, ast.alias):
            out.extend(filter(None, (node.name, node.asname)))
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append(node.module)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
            out.append(node.value)
    return out


def test_models_qwen_knows_nothing_of_lora():
    for f in _modules("models/qwen"):
        found = [w for w in _words(ast.parse(f.read_text())) if "lora" in w.lower()]
        assert not found, f"{f.relative_to(ROOT)}: {found[:3]} (models/qwen is below lora: declare a protocol instead)"


def test_the_check_sees_what_it_refuses():
    """The walk above finds a matched string, a name and an attribute (so the test can fail)."""
    code = 'x = [n for n in names if ".lora_" in n]\nLORA_X = 1\nhead.lora_A\n'
    found = sorted(w for w in _words(ast.parse(code)) if "lora" in w.lower())
    assert found == sorted([".lora_", "LORA_X", "lora_A"])
