"""Chat templates rendered exactly as transformers renders them (``apply_chat_template``).

A model directory carries its chat template (``chat_template.jinja``, or ``chat_template`` in
``tokenizer_config.json``): a Jinja program that turns ``messages`` (+ ``tools``,
``add_generation_prompt``, ``enable_thinking``, ...) into the text the model was trained on.
`render` runs it the way transformers 5 does (``utils/chat_template_utils.py``):

* jinja2's ``ImmutableSandboxedEnvironment`` (templates are untrusted code) with
  ``trim_blocks``, ``lstrip_blocks``, the ``loopcontrols`` extension and a ``{% generation %}``
  tag (rendered as its body); a ``tojson`` filter that keeps non-ASCII text
  (``ensure_ascii=False``, optional indent/separators/sort_keys); globals ``raise_exception``,
  ``strftime_now``, a ``dict`` constructor and a ``namespace`` that refuses ``_`` names;
* the inputs rebuilt from plain JSON values, message keys whose value is None dropped, and a
  message's reasoning available as ``reasoning_content`` (and ``thinking``) whichever of
  ``reasoning_content`` / ``thinking`` / ``reasoning`` it came under;
* template variables: ``messages``, ``tools``, ``documents``, ``add_generation_prompt``, the
  tokenizer's named special tokens (``eos_token``, ``pad_token``, ...), then any keyword the
  caller passes (``enable_thinking=False``).

`mark_special_text` wraps special-token text found in the caller's strings in private-use
markers before rendering (transformers' ``sanitize_control_tokens``), so the tokenizer can
encode it as text while the template's own control tokens stay control tokens.

A directory without any template renders with `CHATML_TEMPLATE` (plain ChatML), and the
tokenizer says so (``Tokenizer.chat_template_source``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np

from fileio.errors import QwenTuneError

# The chat template of Qwen2.5-*-Instruct (tokenizer_config.json "chat_template"), verbatim.
QWEN25_CHAT_TEMPLATE = (
    '{%- if tools %}\n'
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    '    {%- else %}\n'
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    '    {%- endif %}\n'
    '    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    '    {%- for tool in tools %}\n'
    '        {{- "\\n" }}\n'
    '        {{- tool | tojson }}\n'
    '    {%- endfor %}\n'
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    '{%- else %}\n'
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    '    {%- else %}\n'
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    '    {%- endif %}\n'
    '{%- endif %}\n'
    '{%- for message in messages %}\n'
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {{- '<|im_start|>' + message.role }}\n"
    '        {%- if message.content %}\n'
    "            {{- '\\n' + message.content }}\n"
    '        {%- endif %}\n'
    '        {%- for tool_call in message.tool_calls %}\n'
    '            {%- if tool_call.function is defined %}\n'
    '                {%- set tool_call = tool_call.function %}\n'
    '            {%- endif %}\n'
    '            {{- \'\\n<tool_call>\\n{"name": "\' }}\n'
    '            {{- tool_call.name }}\n'
    '            {{- \'", "arguments": \' }}\n'
    '            {{- tool_call.arguments | tojson }}\n'
    "            {{- '}\\n</tool_call>' }}\n"
    '        {%- endfor %}\n'
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n"
    '        {%- endif %}\n'
    "        {{- '\\n<tool_response>\\n' }}\n"
    '        {{- message.content }}\n'
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n"
    '        {%- endif %}\n'
    '    {%- endif %}\n'
    '{%- endfor %}\n'
    '{%- if add_generation_prompt %}\n'
    "    {{- '<|im_start|>assistant\\n' }}\n"
    '{%- endif %}\n'
)


# Plain ChatML, for a model directory that has no chat template at all. It refuses what it
# cannot render rather than dropping it: tools, tool calls and reasoning.
CHATML_TEMPLATE = (
    "{%- if tools %}{{ raise_exception('the plain ChatML template (used because the model has no chat template) "
    "cannot render tools') }}{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.tool_calls is defined or message.reasoning_content is defined %}"
    "{{ raise_exception('the plain ChatML template (used because the model has no chat template) cannot render "
    "tool calls or reasoning') }}{%- endif %}\n"
    "    {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)
CHATML_FALLBACK = "ChatML fallback"

# Private-use characters wrapped around special-token text in the caller's strings (the same
# code points transformers uses), see mark_special_text.
MARK_START = "\U000f0000"
MARK_END = "\U000f0001"

# Names a message's reasoning comes under; templates read the first (gpt-oss ones: "thinking").
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(QwenTuneError, ValueError):
    """A conversation or template that cannot be rendered (names the message, key or template)."""


class ChatTemplateFallbackWarning(UserWarning):
    """A model directory has no chat template: chats are rendered as plain ChatML."""


# ---------------------------------------------------------------------- the Jinja environment
def _environment():
    """A jinja2 sandbox configured as transformers configures it for chat templates."""
    import jinja2
    import jinja2.exceptions
    import jinja2.ext
    import jinja2.nodes
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    version = tuple(int(x) for x in re.findall(r"\d+", jinja2.__version__)[:3])
    if version < (3, 1, 6):  # older releases have known sandbox escapes; templates are untrusted
        raise ChatTemplateError(f"chat templates need jinja2>=3.1.6 (found {jinja2.__version__}): pip install -U jinja2")

    class GenerationTag(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}``: renders its body (assistant masks come from
        the rendered ChatML structure, see models/qwen/tokenizer/chat.py)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        """``dict(...)`` for templates, without exposing the dict type itself."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        """``namespace(...)`` that refuses underscore names (no reaching CPython internals)."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}")

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        """The sandbox, with `*` and `**` refused where their result would be huge (one C-level
        operation that no time budget could interrupt)."""

        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            if operator == "*" and _sized_repeat(left, right) > MAX_RENDER_CHARS:
                raise jinja2.exceptions.SecurityError(f"a repetition of more than {MAX_RENDER_CHARS} items")
            if operator == "**" and _power_bits(left, right) > MAX_POWER_BITS:
                raise jinja2.exceptions.SecurityError(f"a power of more than {MAX_POWER_BITS} bits")
            return super().call_binop(context, operator, left, right)

    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env


@functools.lru_cache(maxsize=1)
def _shared_environment():
    return _environment()


@functools.lru_cache(maxsize=16)
def compile_template(template: str):
    """The compiled Jinja template (cached: SFT renders the same template for every sample)."""
    import jinja2.exceptions

    try:
        return _shared_environment().from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template line {e.lineno}: {e.message}") from None


def select_template(template: Union[str, Mapping[str, str]], tools: Optional[Sequence[Any]], source: str) -> str:
    """The template to use: a single one, or from named ones 'tool_use' (with tools) / 'default'."""
    if isinstance(template, str):
        return template
    if tools is not None and "tool_use" in template:
        return template["tool_use"]
    if "default" in template:
        return template["default"]
    raise ChatTemplateError(f"{source}: several chat templates {sorted(template)} and none named 'default'")


# ---------------------------------------------------------------------- inputs as templates see them
def _plain(value: Any) -> Any:
    """`value` rebuilt from plain JSON types (what the sandbox may see); anything else -> '<TypeName>'."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # subclasses (enums, numpy strings) may carry methods: strip them
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):  # np.bool_(False) must not become a truthy placeholder
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return f"<{type(value).__name__}>"


def prepare_messages(messages: Any) -> List[dict]:
    """The conversation as the template sees it (see the module docstring).

    Raises ChatTemplateError for anything that is not a non-empty list of dicts with a string role.
    """
    if not isinstance(messages, (list, tuple)) or len(messages) == 0:
        raise ChatTemplateError(f"messages: expected a non-empty list of messages, got {messages!r:.80}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatTemplateError(f"messages[{i}]: expected a dict with 'role' and 'content', got {type(m).__name__}")
        if not isinstance(m.get("role"), str):
            raise ChatTemplateError(f"messages[{i}]['role']: expected a string, got {m.get('role')!r:.40}")
        m = {k: v for k, v in _plain(dict(m)).items() if v is not None}
        reasoning = next((m[k] for k in REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def prepare_tools(tools: Any) -> Optional[List[dict]]:
    """Tools as JSON-schema dicts (OpenAI style ``{"type": "function", "function": {...}}``)."""
    if tools is None:
        return None
    if not isinstance(tools, (list, tuple)):
        raise ChatTemplateError(f"tools: expected a list of JSON-schema dicts, got {type(tools).__name__}")
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise ChatTemplateError(f"tools[{i}]: expected a JSON-schema dict, got {type(tool).__name__}")
    return _plain(list(tools))


def render(
    template: str,
    messages: List[dict],
    tools: Optional[List[dict]] = None,
    documents: Optional[List[dict]] = None,
    add_generation_prompt: bool = False,
    variables: Optional[Dict[str, Any]] = None,
    source: str = "chat template",
) -> str:
    """Run `template` on already prepared inputs (`prepare_messages`, `prepare_tools`).

    variables: the other template variables (special tokens, enable_thinking, ...).
    Errors raised by the template (raise_exception, undefined values) become ChatTemplateError
    naming `source`.
    """
    import jinja2.exceptions

    compiled = compile_template(template)
    try:
        with render_budget():
            chunks = compiled.generate(
                messages=messages, tools=tools, documents=_plain(documents),
                add_generation_prompt=add_generation_prompt, **_plain(dict(variables or {})))
            return _bounded_join(chunks)
    except RenderTimeout:
        raise ChatTemplateError(f"{source}: rendering ran past its budget of {RENDER_BUDGET_S:g} s (a template "
                                "that loops without end?)") from None
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"{source}: {type(e).__name__}: {e}") from None
    except (TypeError, KeyError, IndexError, AttributeError, OverflowError, RecursionError, MemoryError) as e:
        # e.g. a template adding a string to a list; range(10**12) (the sandbox's OverflowError)
        raise ChatTemplateError(f"{source}: {type(e).__name__} while rendering: {e}") from None


# ---------------------------------------------------------------------- the render budget
# A chat template is a program: one that never ends would hang a stage, one that writes
# gigabytes would exhaust memory. Real templates render a conversation in milliseconds.
RENDER_BUDGET_S = 5.0
MAX_RENDER_CHARS = 64 << 20   # 64 Mi characters: ~500x a 128k-token conversation
MAX_POWER_BITS = 1 << 16


class RenderTimeout(Exception):
    """Raised inside a render that ran past RENDER_BUDGET_S (by the watchdog thread)."""


def _bounded_join(chunks: Iterable[str]) -> str:
    out, size = [], 0
    for chunk in chunks:
        size += len(chunk)
        if size > MAX_RENDER_CHARS:
            import jinja2.exceptions

            raise jinja2.exceptions.SecurityError(f"the rendering is longer than {MAX_RENDER_CHARS} characters")
        out.append(chunk)
    return "".join(out)


def _sized_repeat(left: Any, right: Any) -> int:
    """Items `left * right` would hold when it repeats a sequence (0 for plain numbers)."""
    for seq, n in ((left, right), (right, left)):
        if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
            return len(seq) * n
    return 0


def _power_bits(base: Any, exponent: Any) -> int:
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0:
        return max(abs(base).bit_length(), 1) * exponent
    return 0


class _Watchdog:
    """One daemon thread per process that raises RenderTimeout in a thread whose render ran past
    its deadline (CPython's PyThreadState_SetAsyncExc: delivered between two bytecodes, which is
    where a looping template spends its time)."""

    def __init__(self):
        import threading

        self.lock = threading.Lock()
        self.deadlines: Dict[int, float] = {}
        self.fired: set = set()
        self.pid = os.getpid()
        self.wake = threading.Event()
        threading.Thread(target=self._watch, name="chat-template-watchdog", daemon=True).start()

    def _watch(self) -> None:
        while True:
            self.wake.wait(0.05 if self.deadlines else None)
            self.wake.clear()
            now = time.monotonic()
            with self.lock:
                for tid, deadline in list(self.deadlines.items()):
                    if now > deadline and tid not in self.fired:
                        self.fired.add(tid)
                        _async_raise(tid, RenderTimeout)

    def start(self, tid: int) -> None:
        with self.lock:
            self.deadlines[tid] = time.monotonic() + RENDER_BUDGET_S
        self.wake.set()

    def stop(self, tid: int) -> None:
        with self.lock:
            self.deadlines.pop(tid, None)
            if tid in self.fired:   # fired just as the render ended: drop the pending exception
                self.fired.discard(tid)
                _async_raise(tid, None)


def _async_raise(tid: int, exc: Optional[type]) -> None:
    import ctypes

    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), ctypes.py_object(exc) if exc else None)


_WATCHDOG: Optional[_Watchdog] = None


@contextlib.contextmanager
def render_budget():
    """Run the body under the render budget (RenderTimeout past RENDER_BUDGET_S)."""
    import threading

    global _WATCHDOG
    if _WATCHDOG is None or _WATCHDOG.pid != os.getpid():   # threads do not survive fork (DataLoader workers)
        _WATCHDOG = _Watchdog()
    tid = threading.get_ident()
    _WATCHDOG.start(tid)
    try:
        yield
    finally:
        _WATCHDOG.stop(tid)


# ---------------------------------------------------------------------- special-token text in inputs
def mark_special_text(obj: Any, tokens: Iterable[str]) -> Any:
    """Wrap every occurrence of `tokens` in the strings of `obj` (values of dicts/lists, not keys)
    in MARK_START/MARK_END; markers already present are dropped first, so none can be forged."""
    regex = _token_regex(tuple(sorted(set(tokens))))
    return _mark(obj, regex)


@functools.lru_cache(maxsize=8)
def _token_regex(tokens: Sequence[str]) -> "re.Pattern[str]":
    ordered = sorted(tokens, key=len, reverse=True)  # a token before the tokens it contains
    return re.compile("|".join(map(re.escape, ordered)) or "(?!)")


def _mark(obj: Any, regex: "re.Pattern[str]") -> Any:
    if isinstance(obj, str):
        obj = obj.replace(MARK_START, "").replace(MARK_END, "")
        return regex.sub(f"{MARK_START}\\g<0>{MARK_END}", obj)
    if isinstance(obj, Mapping):
        return {k: _mark(v, regex) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_mark(v, regex) for v in obj]
    return obj


@functools.lru_cache(maxsize=8)
def marker_regex(added_tokens: Sequence[str]) -> "re.Pattern[str]":
    """Splits a marked rendering: group 1 = a marked added token; a lone marker matches without it."""
    ordered = sorted(added_tokens, key=len, reverse=True)
    inner = "|".join(map(re.escape, ordered)) or "(?!)"
    return re.compile(f"{MARK_START}({inner}){MARK_END}|[{MARK_START}{MARK_END}]")


# ---------------------------------------------------------------------- content given as parts
def has_content_parts(messages: Sequence[Mapping[str, Any]]) -> bool:
    """Whether any message's content is a list of parts (OpenAI style) rather than a string."""
    return any(isinstance(m.get("content"), (list, tuple)) for m in messages)


def join_text_parts(messages: Sequence[Mapping[str, Any]]) -> List[dict]:
    """The messages with each list of text parts joined by "\\n" into one string: the content a
    string-only template (Qwen2.5's, Qwen3's, which transformers cannot render with parts) is
    served with, as vLLM joins text parts for such templates."""
    return [{**m, "content": "\n".join(p["text"] for p in m["content"])}
            if isinstance(m.get("content"), (list, tuple)) else dict(m) for m in messages]
