"""fileio/safe_load.py: the one JSON and YAML loader. Ordinary documents parse exactly as
the json and yaml modules parse them (the reference); nesting past MAX_DEPTH, numbers past
Python's digit limit and YAML alias bombs are one error with the line, fast."""

from __future__ import annotations

import json
import time

import pytest
import yaml

from fileio.safe_load import MAX_DEPTH, NestingError, loads_json, loads_yaml, read_json

DOCUMENTS = ['{"a": [1, 2.5, null, true, "x\\"]["], "b": {"c": {}}}', "[]", '"text"', "1e400",
             "[" * MAX_DEPTH + "]" * MAX_DEPTH]   # exactly at the cap


@pytest.mark.parametrize("text", DOCUMENTS)
def test_ordinary_json_parses_as_the_json_module_parses_it(text):
    assert loads_json(text) == json.loads(text)
    assert loads_json(text.encode()) == json.loads(text)


@pytest.mark.parametrize("text,line", [
    ("[" * 5000 + "]" * 5000, 1),                       # past the C parser's recursion limit
    ('{\n"a":\n' + "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1) + "}", 3),   # parses, but deeper than the cap
    ('["[[[[", \n' + "[" * 3000, 2),                    # brackets inside strings are not nesting
])
def test_json_nested_too_deep_is_one_error_with_its_line(text, line):
    with pytest.raises(NestingError, match=f"nested deeper than {MAX_DEPTH} levels") as e:
        loads_json(text)
    assert isinstance(e.value, json.JSONDecodeError) and e.value.lineno == line


def test_json_number_past_the_digit_limit_is_a_decode_error():
    with pytest.raises(json.JSONDecodeError, match="a number is too long .5000 digits."):
        loads_json('{"a":\n' + "1" * 5000 + "}")


def test_read_json_names_the_file_and_line_and_the_expected_type(tmp_path):
    file = tmp_path / "x.json"
    file.write_text('{\n"a": ' + "[" * 3000)
    with pytest.raises(ValueError, match=r"x\.json:2: malformed JSON \(nested deeper"):
        read_json(file)
    file.write_text('"a string"')
    with pytest.raises(KeyError, match=r"x\.json: expected a JSON object, got a string"):
        read_json(file, KeyError, dict)
    file.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(ValueError, match=r"x\.json: not UTF-8 text \(byte 7\)"):
        read_json(file)


@pytest.mark.parametrize("text", ["a: 1\nb: [x, {c: d}]\n", "- &a {x: 1}\n- *a\n", "", "k: !!set {a, b}"])
def test_ordinary_yaml_parses_as_yaml_safe_load_parses_it(text):
    assert loads_yaml(text) == yaml.safe_load(text)


@pytest.mark.parametrize("text,line", [
    ("a:\n  b: " + "[" * 5000 + "]" * 5000, 2),
    # block mappings, one per line: the one at depth MAX_DEPTH + 1 starts on that line
    ("".join("  " * i + f"k{i}:\n" for i in range(MAX_DEPTH + 5)) + "  " * (MAX_DEPTH + 5) + "v", MAX_DEPTH + 1),
])
def test_yaml_nested_too_deep_is_one_error_with_its_line(text, line):
    with pytest.raises(yaml.MarkedYAMLError, match="nested deeper than") as e:
        loads_yaml(text)
    assert e.value.problem_mark.line + 1 == line


def test_yaml_alias_bomb_is_refused_fast():
    lines = ["a: &a [" + ", ".join(["x"] * 10) + "]"]
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 10) + "]")   # 10**9 values in all
    start = time.monotonic()
    with pytest.raises(yaml.YAMLError, match="more than 1000000 values"):
        loads_yaml("\n".join(lines))
    assert time.monotonic() - start < 10
