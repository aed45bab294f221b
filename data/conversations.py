"""SFT records -> conversations: the messages (and tools) a chat template renders.

Formats (detected per file from its first record, or given with fmt=):

  alpaca:   {"instruction", "input" (optional), "output", "system" (optional), "history" (optional [[q, a], ...])}
  messages: {"messages": [message, ...], "tools" (optional)}                 (OpenAI style)
  sharegpt: {"conversations": [{"from", "value"}, ...], "system" (optional), "tools" (optional)}

A message is {"role": "system"|"user"|"assistant"|"tool", "content": str or parts} plus, on assistant
messages, "reasoning_content" (str) and "tool_calls" (a list of
{"type": "function", "function": {"name": str, "arguments": object or JSON text}}; the flat
{"name", "arguments"} form is accepted too), and on tool messages "name" / "tool_call_id".
An assistant message with tool_calls may have no content. Arguments given as JSON text are
parsed into objects: Qwen2.5's template writes them with ``tojson`` (a string would come out
quoted), and for Qwen3's template an object renders as the same JSON text.

Content may be a list of text parts, OpenAI style ([{"type": "text", "text": str}, ...]): it
reaches the chat template as a list (Qwen3.5's template renders the parts itself; for a
template that takes only strings, the tokenizer joins them, see Tokenizer.apply_chat_template).
An image, video, audio or file part is an error naming the file, line, message and part: we
train the text model, and a placeholder token without its pixels would teach it nothing true.

A record may carry "chat_template_kwargs": a JSON object of template variables for this
record alone ({"enable_thinking": false}, {"preserve_thinking": true}), as TRL reads them;
they override the run's --chat-template-kwargs.

ShareGPT speakers: system; human/user; gpt/assistant/chatgpt/model/bot; LLaMA-Factory's
function_call (value: a JSON {"name", "arguments"} or a list of them -> an assistant message
with tool_calls) and observation / tool (-> a tool message).

"tools" is a list of JSON schemas, or JSON text of one (LLaMA-Factory): OpenAI style
{"type": "function", "function": {...}}, or a bare function schema {"name", "description",
"parameters"} which is wrapped into that form (the form Qwen's templates are served with).

A conversation is an optional system message, then user turns: a user message, then the
assistant's reply, where an assistant message with tool_calls may be followed by tool
results and another assistant message; it ends with an assistant message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

from fileio.safe_load import loads_json

from .errors import DataError

FORMATS = ("alpaca", "messages", "sharegpt")
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "model": "assistant", "bot": "assistant",
    "function_call": "assistant",
    "observation": "tool", "tool": "tool",
}


@dataclass
class Conversation:
    """Messages as the chat template takes them, and the tools offered (None: no tools)."""

    messages: List[Dict[str, Any]]
    tools: Optional[List[Dict[str, Any]]] = None
    template_kwargs: Dict[str, Any] = field(default_factory=dict)  # the record's chat_template_kwargs


def detect_format(example: Mapping[str, Any], where: str = "example") -> str:
    """'messages', 'sharegpt' or 'alpaca' from the record's keys."""
    if not isinstance(example, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(example).__name__}", "not-object")
    if "messages" in example:
        return "messages"
    if "conversations" in example:
        return "sharegpt"
    if "instruction" in example or "output" in example:
        return "alpaca"
    raise DataError(
        f"{where}: cannot tell the format: expected a field 'messages' (messages), 'conversations' (ShareGPT) "
        f"or 'instruction' + 'output' (alpaca); got keys {sorted(example)[:8]}",
        "missing-field",
    )


def _field(example: Mapping[str, Any], key: str, where: str, optional: bool = False, kind=str):
    if key not in example or example[key] is None:
        if optional:
            return None
        raise DataError(f"{where}: missing field {key!r}", "missing-field")
    value = example[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(f"{where}: field {key!r} must be a {names}, got {type(value).__name__}", "bad-field")
    return value


def _json_text(value: Any, where: str) -> Any:
    """`value`, or the JSON it holds when it is a string."""
    if not isinstance(value, str):
        return value
    try:
        return loads_json(value)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg} at character {e.pos}): {value[:60]!r}", "bad-field") from None


# ---------------------------------------------------------------------- tools and tool calls
def parse_tools(value: Any, where: str) -> Optional[List[Dict[str, Any]]]:
    """A record's "tools" -> OpenAI-style schemas (see the module docstring); None when absent or empty."""
    if value is None:
        return None
    tools = _json_text(value, f"{where}: field 'tools'")
    if not isinstance(tools, list):
        raise DataError(f"{where}: field 'tools' must be a list of function schemas, got {type(tools).__name__}", "bad-field")
    out = []
    for i, tool in enumerate(tools):
        at = f"{where}: tools[{i}]"
        if isinstance(tool, Mapping) and isinstance(tool.get("function"), Mapping):
            if not isinstance(tool["function"].get("name"), str):
                raise DataError(f"{at}: 'function' needs a string 'name'", "bad-field")
            out.append(dict(tool))
        elif isinstance(tool, Mapping) and isinstance(tool.get("name"), str):
            out.append({"type": "function", "function": dict(tool)})
        else:
            raise DataError(f"{at}: expected {{'type': 'function', 'function': {{'name', ...}}}} or a function "
                            f"schema with a 'name', got {str(tool)[:60]!r}", "bad-field")
    return out or None


def parse_tool_call(call: Any, where: str) -> Dict[str, Any]:
    """One tool call -> {"type": "function", "function": {"name", "arguments": object}} (+ "id")."""
    if not isinstance(call, Mapping):
        raise DataError(f"{where}: expected an object with 'function' (or 'name' and 'arguments'), got {type(call).__name__}", "bad-field")
    function = call.get("function", call)
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise DataError(f"{where}: the tool call needs a string 'name' (in 'function')", "bad-field")
    if "arguments" not in function:
        raise DataError(f"{where}: the tool call {function['name']!r} has no 'arguments'", "missing-field")
    arguments = _json_text(function["arguments"], f"{where}: arguments of {function['name']!r}")
    if not isinstance(arguments, Mapping):
        raise DataError(f"{where}: arguments of {function['name']!r} must be a JSON object, got {type(arguments).__name__}", "bad-field")
    out: Dict[str, Any] = {"type": "function", "function": {"name": function["name"], "arguments": dict(arguments)}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def _tool_calls(value: Any, where: str) -> List[Dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: 'tool_calls' must be a non-empty list", "bad-field")
    return [parse_tool_call(c, f"{where}: tool_calls[{i}]") for i, c in enumerate(value)]


# ---------------------------------------------------------------------- content and template variables
MEDIA_PARTS = {"image": "image", "image_url": "image", "input_image": "image", "video": "video",
               "video_url": "video", "audio": "audio", "input_audio": "audio", "file": "file"}


def parse_content(value: Any, where: str) -> Any:
    """A message's content: a string, or a list of text parts (checked, each {"type": "text", "text"})."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise DataError(f"{where}: field 'content' must be a string or a list of text parts, got "
                        f"{type(value).__name__}", "bad-field")
    parts = []
    for k, part in enumerate(value):
        kind = media_kind(part)
        if kind is not None:
            raise DataError(f"{where}: content[{k}] is {'an' if kind[0] in 'aeiou' else 'a'} {kind} part; this trains the text model, so training data "
                            "may hold text parts only (a placeholder token without its pixels would be trained)",
                            "media-part")
        if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            raise DataError(f"{where}: content[{k}]: expected a text part {{\"type\": \"text\", \"text\": \"...\"}}, "
                            f"got {json.dumps(part, ensure_ascii=False)[:60]}", "bad-field")
        parts.append({"type": "text", "text": part["text"]})
    return parts


def media_kind(part: Any) -> Optional[str]:
    """'image', 'video', 'audio' or 'file' for a media part (by its type, or the key a template reads)."""
    if not isinstance(part, Mapping):
        return None
    kind = MEDIA_PARTS.get(part.get("type")) if isinstance(part.get("type"), str) else None
    return kind or next((MEDIA_PARTS[k] for k in ("image", "image_url", "video") if k in part), None)


def content_text(content: Any) -> str:
    """The text of a content (its text parts concatenated, as Qwen3.5's template renders them)."""
    return content if isinstance(content, str) else "".join(p["text"] for p in content)


# Names the caller of apply_chat_template sets itself: not template variables one may override.
RESERVED_TEMPLATE_KWARGS = ("messages", "tools", "documents", "add_generation_prompt", "tokenize",
                            "return_assistant_mask", "sanitize_special_tokens", "chat_template",
                            "continue_final_message", "return_dict", "return_tensors", "padding", "truncation",
                            "max_length", "tokenizer_kwargs", "return_assistant_tokens_mask")


def template_kwargs_problem(value: Any) -> Optional[str]:
    """Why `value` cannot be chat-template keyword arguments (None when it can): a JSON object
    whose keys are not the names apply_chat_template itself sets."""
    if not isinstance(value, Mapping):
        return f"expected a JSON object of template variables, got {type(value).__name__}"
    reserved = [k for k in value if k in RESERVED_TEMPLATE_KWARGS]
    if reserved:
        return f"{reserved[0]!r} is set by qwen-tune itself, not a template variable"
    return None


def template_kwargs_of(example: Mapping[str, Any], where: str) -> Dict[str, Any]:
    """A record's "chat_template_kwargs" (a JSON object; {} when absent)."""
    value = example.get("chat_template_kwargs")
    if value is None:
        return {}
    problem = template_kwargs_problem(value)
    if problem:
        raise DataError(f"{where}: field 'chat_template_kwargs': {problem}", "bad-field")
    return dict(value)


# ---------------------------------------------------------------------- messages
def parse_message(m: Any, where: str) -> Dict[str, Any]:
    """One OpenAI-style message, checked and normalised (see the module docstring)."""
    if not isinstance(m, Mapping):
        raise DataError(f"{where}: must be an object with 'role' and 'content'", "bad-field")
    role = _field(m, "role", where)  # which roles may come where: check_roles
    out: Dict[str, Any] = {"role": role}
    tool_calls = m.get("tool_calls")
    if tool_calls is not None:
        if role != "assistant":
            raise DataError(f"{where}: only assistant messages carry 'tool_calls' (role {role!r})", "bad-field")
        out["tool_calls"] = _tool_calls(tool_calls, where)
    content = _field(m, "content", where, optional=tool_calls is not None, kind=object)  # checked below
    out["content"] = "" if content is None else parse_content(content, where)
    if m.get("reasoning_content") is not None:
        if role != "assistant":
            raise DataError(f"{where}: only assistant messages carry 'reasoning_content' (role {role!r})", "bad-field")
        out["reasoning_content"] = _field(m, "reasoning_content", where)
    if role == "tool":
        for key in ("name", "tool_call_id"):
            if m.get(key) is not None:
                out[key] = _field(m, key, where)
    return out


def _sharegpt_message(m: Any, where: str) -> Dict[str, Any]:
    if not isinstance(m, Mapping):
        raise DataError(f"{where}: must be an object with 'from' and 'value'", "bad-field")
    who = _field(m, "from", where)
    if who not in SHAREGPT_ROLES:
        raise DataError(f"{where}['from'] = {who!r}; expected one of {sorted(SHAREGPT_ROLES)}", "bad-roles")
    if who == "function_call":
        calls = _json_text(_field(m, "value", where, kind=(str, list, dict)), f"{where}: value")
        calls = calls if isinstance(calls, list) else [calls]
        return {"role": "assistant", "content": "", "tool_calls": _tool_calls(calls, where)}
    return {"role": SHAREGPT_ROLES[who], "content": _field(m, "value", where)}


def to_conversation(example: Mapping[str, Any], fmt: Optional[str] = None, where: str = "example") -> Conversation:
    """A record in any supported format -> Conversation (validated, see check_roles)."""
    fmt = fmt or detect_format(example, where)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    if not isinstance(example, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(example).__name__}", "not-object")
    messages: List[Dict[str, Any]] = []
    tools = None
    if fmt == "alpaca":
        instruction = _field(example, "instruction", where)
        output = _field(example, "output", where)
        extra = _field(example, "input", where, optional=True)
        system = _field(example, "system", where, optional=True)
        history = _field(example, "history", where, optional=True, kind=list) or []
        if system:
            messages.append({"role": "system", "content": system})
        for i, pair in enumerate(history):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise DataError(f"{where}: history[{i}] must be a [question, answer] pair of strings", "bad-field")
            messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        prompt = instruction + ("\n\n" + extra if extra else "")
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    elif fmt == "messages":
        items = _field(example, "messages", where, kind=list)
        messages = [parse_message(m, f"{where}: messages[{i}]") for i, m in enumerate(items)]
        tools = parse_tools(example.get("tools"), where)
    else:
        items = _field(example, "conversations", where, kind=list)
        system = _field(example, "system", where, optional=True)
        if system:
            messages.append({"role": "system", "content": system})
        messages += [_sharegpt_message(m, f"{where}: conversations[{i}]") for i, m in enumerate(items)]
        tools = parse_tools(example.get("tools"), where)
    check_roles(messages, where)
    return Conversation(messages, tools, template_kwargs_of(example, where))


def to_messages(example: Mapping[str, Any], fmt: Optional[str] = None, where: str = "example") -> List[Dict[str, Any]]:
    """A record in any supported format -> its messages (validated, see check_roles)."""
    return to_conversation(example, fmt, where).messages


def check_roles(messages: Sequence[Mapping[str, Any]], where: str = "example") -> None:
    """Optional system first; then user, assistant (tool results after an assistant's tool calls,
    then assistant again), user, ...; ending with an assistant message."""
    if not messages:
        raise DataError(f"{where}: empty conversation", "bad-roles")
    roles = [m["role"] for m in messages]
    start = 1 if roles[0] == "system" else 0
    previous = None
    for i in range(start, len(messages)):
        role = roles[i]
        if previous is None:
            allowed = ("user",)
        elif previous == "user":
            allowed = ("assistant",)
        elif previous == "assistant":
            allowed = ("user", "tool") if messages[i - 1].get("tool_calls") else ("user",)
        else:  # tool results, then more of them or the assistant again
            allowed = ("tool", "assistant")
        if role not in allowed:
            expected = " or ".join(repr(a) for a in allowed)
            raise DataError(
                f"{where}: message {i} has role {role!r}, expected {expected} (roles {roles}: an optional system "
                "message, then user/assistant alternating, tool results only after an assistant's tool_calls)",
                "bad-roles",
            )
        previous = role
    if roles[-1] != "assistant" or len(roles) == start:
        raise DataError(f"{where}: the conversation must end with an assistant turn (roles {roles})", "bad-roles")
