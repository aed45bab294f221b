"""ChatML rendering exactly as Qwen2.5's chat template does it, without a Jinja engine.

Qwen2.5's template (``QWEN25_CHAT_TEMPLATE``, the string shipped in every Qwen2.5
``tokenizer_config.json``) renders a system/user/assistant conversation as

    <|im_start|>system\\n{system}<|im_end|>\\n
    <|im_start|>user\\n{content}<|im_end|>\\n
    <|im_start|>assistant\\n{content}<|im_end|>\\n
    ...
    <|im_start|>assistant\\n                      (only with add_generation_prompt)

where the system block is the first message when its role is "system", else the template's
default system prompt ("You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
for Qwen2.5, "You are a helpful assistant." for Qwen2; Qwen3 templates have none, and then
no system block is written).

The conversation is produced as a list of `Segment`s: control tokens (by name) and plain text
between them. Joining them gives the template's string; encoding them one by one (control
tokens as ids, text as ordinary text) gives the same ids as tokenising the whole string with
special tokens allowed — tiktoken and HF both split on special tokens first — except that
special-token text typed inside a message stays plain text and cannot inject a control token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
QWEN25_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
ROLES = ("system", "user", "assistant")

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


class ChatTemplateError(ValueError):
    """A conversation the ChatML renderer cannot render (names the message and key)."""


@dataclass(frozen=True)
class Segment:
    """One piece of a rendered conversation.

    special: True for a control token (`text` is its name, e.g. "<|im_start|>").
    message: index of the message this piece belongs to (None for the generation prompt).
    content_start: for the text piece holding a message, the character offset where the
        message content starts (after "role\\n"); None for other pieces.
    """

    text: str
    special: bool = False
    message: Optional[int] = None
    role: Optional[str] = None
    content_start: Optional[int] = None


# A literal system block inside a template: '<|im_start|>system\n' + TEXT + '<|im_end|>' in one
# quoted Jinja string, the newline written as an escape (Qwen2.5) or as a real newline (Qwen2).
_DEFAULT_SYSTEM_RE = re.compile(r"""(['"])<\|im_start\|>system(?:\\n|\n)((?:(?!\1).)*?)<\|im_end\|>""", re.S)


def default_system_prompt(template: Optional[str]) -> Optional[str]:
    """The default system prompt a chat template writes when the conversation has none.

    None template (no tokenizer_config.json): Qwen2.5's default. A template whose system
    block is always taken from the messages (Qwen3): None, i.e. no system block.
    """
    if template is None:
        return QWEN25_DEFAULT_SYSTEM
    m = _DEFAULT_SYSTEM_RE.search(template)
    if m is None:
        return None
    text = m.group(2)
    # Undo the Jinja string escapes the literal may use.
    return text.replace("\\n", "\n").replace("\\'", "'").replace('\\"', '"')


def check_messages(messages: Any, where: str = "messages") -> List[dict]:
    """Validate a conversation: a non-empty list of {"role", "content": str} dicts.

    Roles are system/user/assistant. Raises ChatTemplateError naming the message index and key.
    """
    if not isinstance(messages, (list, tuple)) or len(messages) == 0:
        raise ChatTemplateError(f"{where}: expected a non-empty list of messages, got {messages!r:.80}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatTemplateError(f"{where}[{i}]: expected a dict with 'role' and 'content', got {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m:
                raise ChatTemplateError(f"{where}[{i}]: missing key {key!r}")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise ChatTemplateError(f"{where}[{i}]['role']: {role!r} is not one of {ROLES}")
        if not isinstance(content, str):
            raise ChatTemplateError(f"{where}[{i}]['content']: expected a string, got {type(content).__name__}")
        out.append(m)
    return out


def chatml_segments(
    messages: Sequence[dict],
    default_system: Optional[str] = QWEN25_DEFAULT_SYSTEM,
    add_generation_prompt: bool = False,
) -> List[Segment]:
    """The conversation as control tokens and text pieces, in Qwen2.5 template order."""
    messages = check_messages(messages)
    segs: List[Segment] = []

    def block(role: str, content: str, index: Optional[int]) -> None:
        head = role + "\n"
        segs.append(Segment(IM_START, special=True, message=index, role=role))
        segs.append(Segment(head + content, message=index, role=role, content_start=len(head)))
        segs.append(Segment(IM_END, special=True, message=index, role=role))
        segs.append(Segment("\n", message=index, role=role))

    first_is_system = messages[0]["role"] == "system"
    if not first_is_system and default_system is not None:
        block("system", default_system, None)
    for i, m in enumerate(messages):
        block(m["role"], m["content"], i)
    if add_generation_prompt:
        segs.append(Segment(IM_START, special=True))
        segs.append(Segment("assistant\n", role="assistant"))
    return segs


def render_chatml(
    messages: Sequence[dict],
    default_system: Optional[str] = QWEN25_DEFAULT_SYSTEM,
    add_generation_prompt: bool = False,
) -> str:
    """The string Qwen2.5's chat template renders for `messages`."""
    return "".join(s.text for s in chatml_segments(messages, default_system, add_generation_prompt))
