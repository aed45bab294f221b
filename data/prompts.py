"""GRPO's prompts: .jsonl rows in TRL's prompt formats.

    prompts, info = load_prompts([Path("prompts.jsonl")], tok, max_prompt_len=512)
    prompts[0] == {"prompt": "What is 2+3?", "prompt_ids": [...], "columns": {"answer": "5"}, "chat": False}

`prompt` is text (tokenised as it is) or a message list (rendered with the model's chat template
and its generation prompt); every other column of the row is kept in `columns` and passed to the
reward functions. A prompt longer than max_prompt_len keeps its last max_prompt_len tokens, as
TRL's max_prompt_length did (counted in the report as prompt-truncated).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from .errors import DataError, InputReport
from .sources import iter_jsonl


def load_prompts(paths: Sequence[Path], tok, max_prompt_len: int, chat_template_kwargs: Optional[dict] = None
                 ) -> Tuple[List[dict], InputReport]:
    """The prompts of every row of `paths` (see the module docstring); a bad row is a DataError
    naming its file and line."""
    report = InputReport()
    out: List[dict] = []
    for path in paths:
        for lineno, row in iter_jsonl(Path(path), report):
            out.append(_prompt(row, path, lineno, tok, max_prompt_len, chat_template_kwargs, report))
            report.kept += 1
    if not out:
        raise DataError(f"{', '.join(map(str, paths))}: no prompts", "empty")
    return out, report


def _prompt(row: dict, path, lineno: int, tok, max_prompt_len: int, kwargs: Optional[dict], report) -> dict:
    where = f"{path}:{lineno}"
    if not isinstance(row, dict) or "prompt" not in row:
        keys = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise DataError(f"{where}: expected a 'prompt' column (text or a list of messages), got keys {keys}",
                        "no-prompt")
    prompt = row["prompt"]
    if isinstance(prompt, str):
        if not prompt:
            raise DataError(f"{where}: 'prompt' is empty", "empty-prompt")
        ids, chat = tok.encode(prompt), False
    elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "role" in m for m in prompt):
        variables = {**(kwargs or {}), **(row.get("chat_template_kwargs") or {})}
        ids = list(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, **variables))
        chat = True
    else:
        raise DataError(f"{where}: 'prompt' must be text or a non-empty list of messages "
                        f"({{\"role\": ..., \"content\": ...}}), got {prompt!r:.80}", "bad-prompt")
    if len(ids) > max_prompt_len:
        ids = ids[-max_prompt_len:]
        report.truncated["prompt-truncated"] += 1
    columns = {k: v for k, v in row.items() if k not in ("prompt", "chat_template_kwargs")}
    return {"prompt": prompt, "prompt_ids": ids, "columns": columns, "chat": chat}
