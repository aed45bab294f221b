"""JSON and YAML parsing that fails as one error, never a RecursionError or a hang.

Every reader of a JSON or YAML file in the library parses through here (config.json, tokenizer
files, safetensors headers, adapter_config.json, run.json, data lines, --config files):

    obj = loads_json(text)                        # json.JSONDecodeError subclasses on bad input
    obj = read_json(path, ConfigError, dict)      # error_type("PATH:LINE: malformed JSON (...)")
    obj = loads_yaml(text)                        # yaml.YAMLError on bad input

The caps: nesting deeper than MAX_DEPTH levels (no real file of these formats nests past ~10),
an integer longer than Python's int-string limit, and (YAML, whose aliases can make a small
file stand for an exponentially large value) more than MAX_YAML_NODES values in all.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Optional

MAX_DEPTH = 100
MAX_YAML_NODES = 1_000_000
# A JSON string literal, or one bracket: a scan that finds where the nesting goes too deep.
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.S)
_LONG_NUMBER = re.compile(r"\d{1000,}")


class NestingError(json.JSONDecodeError):
    """JSON nested deeper than MAX_DEPTH levels, or a number too long to convert."""


def loads_json(text: "str | bytes") -> Any:
    """json.loads with the caps above. Bytes are decoded as UTF-8 (UnicodeDecodeError if not)."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8")
    try:
        obj = json.loads(text)
    except RecursionError:
        raise _too_deep(text) from None
    except json.JSONDecodeError:
        raise
    except ValueError:   # int("1" * 5000): past Python's limit on integer digits
        found = _LONG_NUMBER.search(text)
        digits = f" ({len(found.group())} digits)" if found else ""
        raise NestingError(f"a number is too long{digits}", text, found.start() if found else 0) from None
    if text.count("[") + text.count("{") > MAX_DEPTH and _depth(obj) > MAX_DEPTH:
        raise _too_deep(text)
    return obj


def read_json(path: os.PathLike, error_type: type = ValueError, expect: Optional[type] = None) -> Any:
    """The JSON file at `path`; malformed, too deep, not UTF-8 or (with `expect`) of another
    type raises error_type("PATH:LINE: ...")."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        obj = loads_json(raw)
    except UnicodeDecodeError as e:
        raise error_type(f"{path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise error_type(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if expect is not None and not isinstance(obj, expect):
        want = {dict: "a JSON object", list: "a JSON array"}.get(expect, expect.__name__)
        raise error_type(f"{path}: expected {want}, got {_json_kind(obj)}")
    return obj


def loads_yaml(text: str) -> Any:
    """yaml.safe_load with the caps above; too deep or too large raises a yaml.MarkedYAMLError
    whose problem_mark is the line."""
    import yaml

    loader = _bounded_loader()(text)
    try:
        obj = loader.get_single_data()
    finally:
        loader.dispose()
    if _nodes(obj) > MAX_YAML_NODES:
        raise yaml.YAMLError(f"more than {MAX_YAML_NODES} values (aliases expanding to a huge document)")
    return obj


# ---------------------------------------------------------------------- helpers
def _json_kind(obj: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(obj), "a number")


def _too_deep(text: str) -> NestingError:
    depth = 0
    for m in _TOKEN.finditer(text):
        c = m.group()
        if c in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return NestingError(f"nested deeper than {MAX_DEPTH} levels", text, m.start())
        elif c in "]}":
            depth -= 1
    return NestingError(f"nested deeper than {MAX_DEPTH} levels", text, 0)


def _children(obj: Any) -> list:
    if isinstance(obj, dict):
        return [v for v in obj.values() if isinstance(v, (dict, list))]
    if isinstance(obj, list):
        return [v for v in obj if isinstance(v, (dict, list))]
    return []


def _depth(obj: Any) -> int:
    """Levels of nesting of a parsed value (iterative: a deep value cannot overflow the stack)."""
    deepest, level = 0, [obj] if isinstance(obj, (dict, list)) else []
    while level and deepest <= MAX_DEPTH:
        deepest += 1
        level = [c for o in level for c in _children(o)]
    return deepest


def _nodes(obj: Any) -> int:
    """Values in a parsed YAML document, counting an aliased value at each use; stops past the cap."""
    count, stack = 0, [obj]
    while stack and count <= MAX_YAML_NODES:
        o = stack.pop()
        count += 1
        if isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, (list, tuple, set)):
            stack.extend(o)
    return count


_LOADER = None


def _bounded_loader() -> type:
    """yaml.SafeLoader that refuses nodes nested deeper than MAX_DEPTH, naming the line."""
    global _LOADER
    if _LOADER is None:
        import yaml

        class BoundedLoader(yaml.SafeLoader):
            depth = 0

            def compose_node(self, parent, index):
                event = self.peek_event()
                level = isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent))
                self.depth += level
                try:
                    if self.depth > MAX_DEPTH:
                        raise yaml.MarkedYAMLError(problem=f"nested deeper than {MAX_DEPTH} levels",
                                                   problem_mark=event.start_mark)
                    return super().compose_node(parent, index)
                finally:
                    self.depth -= level

        _LOADER = BoundedLoader
    return _LOADER
