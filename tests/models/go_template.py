"""A minimal emulation of Go's text/template, enough to render an Ollama TEMPLATE in tests.

Covers what Ollama's chat templates use: text with `{{- ` / ` -}}` whitespace trimming, output
of a pipeline, `if` / `else if` / `else` / `end`, `range [$i, $v :=] X`, `$x := X`, fields
(`.Role`, `$.Messages`, `$x.Field`), string and integer literals, parentheses and the functions
eq, ne, and, or, not, len, slice. Truth is Go's: false, 0, "", None and empty lists are false.
Data is dicts (Ollama's structs) and lists. Anything else raises: a test must not pass on a
construct this emulation silently misreads.
"""

from __future__ import annotations

import re
from typing import Any

ACTION = re.compile(r"{{(-\s)?(.*?)(\s-)?}}", re.S)
TOKEN = re.compile(r'\(|\)|"(?:[^"\\]|\\.)*"|:=|,|[^\s(),]+')


def render(template: str, data: dict) -> str:
    nodes, rest = _parse(_lex(template), 0, top=True)
    out: list[str] = []
    _run(nodes, data, {"$": data}, data, out)
    return "".join(out)


def _lex(template: str) -> list[tuple[str, str]]:
    items, pos = [], 0
    for m in ACTION.finditer(template):
        text = template[pos:m.start()]
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        if items and items[-1][0] == "trim-next":
            items.pop()
            text = text.lstrip(" \t\r\n")
        items.append(("text", text))
        items.append(("action", m.group(2).strip()))
        if m.group(3):
            items.append(("trim-next", ""))
        pos = m.end()
    text = template[pos:]
    if items and items[-1][0] == "trim-next":
        items.pop()
        text = text.lstrip(" \t\r\n")
    items.append(("text", text))
    return items


def _parse(items, i, top=False):
    """Nodes until the matching end/else (returned as the stop word) or the end of input."""
    nodes = []
    while i < len(items):
        kind, value = items[i]
        i += 1
        if kind == "text":
            nodes.append(("text", value))
            continue
        word = value.split(None, 1)[0] if value else ""
        if word in ("end", "else"):
            return nodes, (value, i)
        if word == "if":
            branches, otherwise = [], []
            cond = value[2:].strip()
            while True:
                body, (stop, i) = _parse(items, i)
                branches.append((cond, body))
                if stop == "end":
                    break
                if stop.startswith("else if"):
                    cond = stop[len("else if"):].strip()
                    continue
                if stop == "else":
                    otherwise, (stop, i) = _parse(items, i)
                    assert stop == "end", stop
                    break
                raise ValueError(f"unexpected {stop!r}")
            nodes.append(("if", branches, otherwise))
        elif word == "range":
            spec = value[len("range"):].strip()
            names, expr = [], spec
            if ":=" in spec:
                left, expr = spec.split(":=", 1)
                names = [n.strip() for n in left.split(",")]
            body, (stop, i) = _parse(items, i)
            assert stop == "end", f"range with {stop!r} is not emulated"
            nodes.append(("range", names, expr.strip(), body))
        elif re.match(r"^\$\w+\s*:=", value):
            name, expr = value.split(":=", 1)
            nodes.append(("assign", name.strip(), expr.strip()))
        else:
            nodes.append(("out", value))
    if not top:
        raise ValueError("missing {{ end }}")
    return nodes, None


def _truth(v: Any) -> bool:
    return not (v is None or v is False or v == 0 or v == "" or (isinstance(v, (list, dict)) and not v))


def _run(nodes, dot, env, root, out):
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "out":
            value = _eval(node[1], dot, env)
            if not isinstance(value, (str, int)):
                raise TypeError(f"printing {type(value).__name__} is not emulated: {node[1]}")
            out.append(str(value))
        elif kind == "assign":
            env[node[1]] = _eval(node[2], dot, env)
        elif kind == "if":
            for cond, body in node[1]:
                if _truth(_eval(cond, dot, env)):
                    _run(body, dot, dict(env), root, out)
                    break
            else:
                _run(node[2], dot, dict(env), root, out)
        elif kind == "range":
            seq = _eval(node[2], dot, env) or []
            for i, item in enumerate(seq):
                scope = dict(env)
                if len(node[1]) == 2:
                    scope[node[1][0]], scope[node[1][1]] = i, item
                elif len(node[1]) == 1:
                    scope[node[1][0]] = item
                _run(node[3], item, scope, root, out)


FUNCS = {
    "eq": lambda a, *b: any(a == x for x in b),
    "ne": lambda a, b: a != b,
    "and": lambda *a: next((x for x in a if not _truth(x)), a[-1]),
    "or": lambda *a: next((x for x in a if _truth(x)), a[-1]),
    "not": lambda a: not _truth(a),
    "len": lambda a: len(a),
    "slice": lambda a, *i: a[i[0]:i[1]] if len(i) == 2 else a[i[0]:] if i else a,
}


def _eval(expr: str, dot, env):
    tokens = TOKEN.findall(expr)
    value, rest = _expr(tokens, dot, env)
    if rest:
        raise ValueError(f"cannot parse {expr!r}")
    return value


def _expr(tokens, dot, env):
    """A command: a function and its arguments, or one term. Returns (value, remaining tokens)."""
    if tokens and tokens[0] in FUNCS:
        name, args, tokens = tokens[0], [], tokens[1:]
        while tokens and tokens[0] != ")":
            value, tokens = _term(tokens, dot, env)
            args.append(value)
        return FUNCS[name](*args), tokens
    return _term(tokens, dot, env)


def _term(tokens, dot, env):
    tok, tokens = tokens[0], tokens[1:]
    if tok == "(":
        value, tokens = _expr(tokens, dot, env)
        assert tokens and tokens[0] == ")", tokens
        return value, tokens[1:]
    if tok.startswith('"'):
        return tok[1:-1].encode().decode("unicode_escape"), tokens
    if re.fullmatch(r"-?\d+", tok):
        return int(tok), tokens
    if tok == ".":
        return dot, tokens
    if tok.startswith("$"):
        head, _, path = tok.partition(".")
        base = env[head]
    elif tok.startswith("."):
        base, path = dot, tok[1:]
    else:
        raise ValueError(f"{tok!r} is not emulated")
    for field in filter(None, path.split(".")):
        base = base.get(field) if isinstance(base, dict) else None
    return base, tokens
