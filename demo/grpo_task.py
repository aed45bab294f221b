"""The embedded default's GRPO task: a verifiable one the tiny demo model can learn in minutes.

Prompts are the demo SFT set's "What is the signature of `mod.func`?" questions (chat messages),
with a `name` column (the object's own name, `func`). The reward, `signature_reward`, checks the
answer's form, as a signature answer has it: 0.5 when the completion starts with a backtick (code),
0.5 when it ends its turn (<|im_end|>) within --max-completion-length tokens, plus 0.5 when it names
`func`. The demo SFT model rambles past the limit, yet some samples start with code or stop early,
so a group's rewards differ and GRPO has something to push on.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import List

QUESTION = re.compile(r"^What is the signature of `([^`]+)`\?$")


def signature_reward(prompts, completions, completion_ids=None, name=None, **columns) -> List[float]:
    """Up to 1.5: code start, stops in time, names the object (see the module docstring)."""
    from models.qwen import CHAT_STOP_IDS
    from train.rewards import completion_text

    out = []
    ids = completion_ids or [None] * len(completions)
    for c, n, cid in zip(completions, name or [None] * len(completions), ids):
        text = completion_text(c).strip()
        stopped = bool(cid) and cid[-1] in CHAT_STOP_IDS
        out.append(None if n is None else 0.5 * text.startswith("`") + 0.5 * stopped + 0.5 * (n in text))
    return out


def prompts_file(sft_file: Path) -> Path:
    """The signature questions of an SFT .jsonl as a GRPO prompts file beside it (written once)."""
    import json

    from data import InputReport
    from data.sources import iter_jsonl

    target = sft_file.with_name(sft_file.stem.replace("sft_", "grpo_") + ".jsonl")
    if target.is_file():
        return target
    rows = []
    for _, record in iter_jsonl(sft_file, InputReport()):
        question = next((m["content"] for m in record.get("messages", []) if m.get("role") == "user"), "")
        found = QUESTION.match(question) if isinstance(question, str) else None
        if found:
            rows.append({"prompt": [{"role": "user", "content": question}],
                         "name": found.group(1).rsplit(".", 1)[-1]})
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, target)
    return target
