"""An Ollama Modelfile next to an exported GGUF, so `ollama create NAME -f Modelfile` imports it.

    # qwen-tune export of /abs/path/runs/sft/merged
    FROM ./model-q8_0.gguf
    TEMPLATE <triple-quoted Go template: ChatML>
    SYSTEM <triple-quoted: You are Qwen, created by Alibaba Cloud. You are a helpful assistant.>
    PARAMETER stop "<|im_end|>"
    PARAMETER stop "<|endoftext|>"

Ollama does not run the GGUF's Jinja chat template: it needs its own (Go text/template)
TEMPLATE. When the model's chat template renders conversations as ChatML (Qwen2, Qwen2.5,
Qwen3 without thinking), TEMPLATE is the Go form of Qwen2.5's template: system, messages,
tools, tool calls and tool results; SYSTEM is the default system message the chat template
inserts when a conversation has none. The stop strings end a reply at the end of the
assistant turn whatever eos the model was saved with. The first line names the model folder
the file was exported from: a later export of the same model into the folder may replace
the Modelfile, another model's may not (see `modelfile_owner`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from ..special_tokens import IM_END, IM_START
from ..tokenizer import ENDOFTEXT, Tokenizer, TokenizerError

MODELFILE = "Modelfile"
STOP_TOKENS = (IM_END, ENDOFTEXT)
OWNER_PREFIX = "# qwen-tune export of "

# Ollama's Go template for Qwen's ChatML: .System (the conversation's system message, else the
# Modelfile's SYSTEM), .Tools, then .Messages; the last assistant message is left open (Ollama
# continues it), every other turn is closed with <|im_end|>. The non-.Messages branch is the
# /api/generate form (.Prompt, .Response).
TEMPLATE = """{{- if .Messages }}
{{- if .Tools }}<|im_start|>system
{{ .System }}

# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{{- range .Tools }}
{"type": "function", "function": {{ .Function }}}
{{- end }}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{{ else if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{- if .Content }}
{{ .Content }}
{{- end }}
{{- range .ToolCalls }}
<tool_call>
{"name": "{{ .Function.Name }}", "arguments": {{ .Function.Arguments }}}
</tool_call>
{{- end }}
{{- if not $last }}<|im_end|>
{{ end }}
{{- else if eq .Role "tool" }}<|im_start|>user
<tool_response>
{{ .Content }}
</tool_response><|im_end|>
{{ end }}
{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant
{{ end }}
{{- end }}
{{- else }}
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{ if .Prompt }}<|im_start|>user
{{ .Prompt }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ end }}{{ .Response }}{{ if .Response }}<|im_end|>{{ end }}"""


def chatml(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """A conversation in ChatML, the form TEMPLATE writes."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def ollama_chat(model_dir: Union[str, os.PathLike]) -> Optional[tuple[str, Optional[str]]]:
    """(TEMPLATE, default system message or None) for the model's chat template, or None when
    it does not render conversations as ChatML (or the folder has no chat template)."""
    try:
        tok = Tokenizer.from_pretrained(Path(model_dir))
        probe = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                 {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}]
        if tok.chat_template is None or tok.apply_chat_template(
                probe, add_generation_prompt=True, tokenize=False) != chatml(probe, True):
            return None
        alone = tok.apply_chat_template(probe[1:2], add_generation_prompt=True, tokenize=False)
    except (TokenizerError, ValueError):   # a template that fails on a plain conversation
        return None
    turn = chatml(probe[1:2], True)
    head = f"{IM_START}system\n"
    if alone == turn:
        return TEMPLATE, None
    if alone.startswith(head) and alone.endswith(f"{IM_END}\n{turn}") and len(alone) > len(head) + len(turn):
        return TEMPLATE, alone[len(head):-len(f"{IM_END}\n{turn}")]
    return None


def modelfile_text(gguf_path: Union[str, os.PathLike], model_dir: Union[str, os.PathLike, None] = None) -> str:
    """The Modelfile for the GGUF at `gguf_path`, which lives in the same directory (FROM is relative).

    With `model_dir` (the folder the GGUF was exported from) it names its owner and carries
    TEMPLATE / SYSTEM for the model's chat template (see `ollama_chat`)."""
    lines = [] if model_dir is None else [OWNER_PREFIX + str(Path(model_dir).resolve())]
    lines.append(f"FROM ./{Path(gguf_path).name}")
    chat = ollama_chat(model_dir) if model_dir is not None else None
    if chat is not None:
        template, system = chat
        lines.append(f'TEMPLATE """{template}"""')
        if system is not None and '"""' not in system:
            lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{s}"' for s in STOP_TOKENS]
    return "\n".join(lines) + "\n"


def modelfile_owner(modelfile: Union[str, os.PathLike]) -> Optional[str]:
    """The model folder a Modelfile we wrote was exported from (its first line), else None."""
    try:
        with open(modelfile, encoding="utf-8", errors="replace") as f:
            first = f.readline().rstrip("\n")
    except OSError:
        return None
    return first[len(OWNER_PREFIX):] if first.startswith(OWNER_PREFIX) else None


def modelfile_path(gguf_path: Union[str, os.PathLike]) -> Path:
    return Path(gguf_path).with_name(MODELFILE)


def write_modelfile(gguf_path: Union[str, os.PathLike], model_dir: Union[str, os.PathLike, None] = None) -> Path:
    """Write `Modelfile` beside the GGUF (temp file + rename); returns its path."""
    path = modelfile_path(gguf_path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(modelfile_text(gguf_path, model_dir), encoding="utf-8")
    os.replace(tmp, path)
    return path
