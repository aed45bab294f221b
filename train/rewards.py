"""Reward functions for GRPO, with TRL's signature:

    fn(prompts, completions, completion_ids=None, **columns) -> list[float | None]

A completion is text, or (chat prompts) a message list [{"role": "assistant", "content": ...}].
None means "this function does not score this completion" (train.grpo.weighted_rewards skips it).

    accuracy_reward: 1.0 when the completion's answer equals the dataset's `answer` column
        (math normalisation: the last \\boxed{...} content, else the last number in the text;
        commas, $ and spaces stripped; numbers equal within 1e-6), else 0.0; None without an answer.
    format_reward: 1.0 when the whole completion matches <think>...</think>\\s*<answer>...</answer>
        (or the pattern given to make_format_reward), else 0.0.
    load_reward_function("FILE.py:NAME"): a user's own function from a Python file.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

Completion = Union[str, Sequence[dict]]

# a number, with thousands commas ("1,000"), decimals or a fraction ("3/4")
NUMBER = re.compile(r"-?\d(?:[\d,]*\d)?(?:\.\d+)?(?:/\d+)?")
THINK_ANSWER = r"<think>.*?</think>\s*<answer>.*?</answer>"
ABS_TOL = 1e-6


def completion_text(completion: Completion) -> str:
    """The text of a completion: itself, or the content of its last message (chat completions)."""
    if isinstance(completion, str):
        return completion
    if not completion or not isinstance(completion[-1], dict) or "content" not in completion[-1]:
        raise ValueError(f"a completion is text or a list of messages with 'content', got {completion!r:.80}")
    return str(completion[-1]["content"])


def boxed_contents(text: str) -> Optional[str]:
    """The content of the last \\boxed{...} (nested braces kept), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def normalise(answer: str) -> str:
    """Strip what does not change a math answer: commas, $, spaces, a trailing period."""
    return re.sub(r"[,\s$]", "", str(answer)).rstrip(".")


def extract_answer(text: str) -> Optional[str]:
    """The answer of a completion: its last \\boxed{} content, else its last number (normalised)."""
    boxed = boxed_contents(text)
    if boxed is not None:
        return normalise(boxed)
    numbers = NUMBER.findall(text)
    return normalise(numbers[-1]) if numbers else None


def _number(s: str) -> Optional[float]:
    try:
        if "/" in s:
            num, den = s.split("/")
            return float(num) / float(den)
        return float(s)
    except (ValueError, ZeroDivisionError):
        return None


def answers_equal(predicted: Optional[str], reference) -> bool:
    """Numeric equality within 1e-6 when both parse as numbers, else equal normalised strings."""
    if predicted is None:
        return False
    ref = normalise(str(reference))
    ref = boxed_contents(ref) or ref
    a, b = _number(predicted), _number(ref)
    if a is not None and b is not None:
        return abs(a - b) <= ABS_TOL
    return predicted == ref


def accuracy_reward(prompts, completions, completion_ids=None, answer=None, **columns) -> List[Optional[float]]:
    """1.0 / 0.0 per completion: does its answer equal the `answer` column? None without one."""
    if answer is None:
        return [None] * len(completions)
    return [None if ref is None else float(answers_equal(extract_answer(completion_text(c)), ref))
            for c, ref in zip(completions, answer)]


def make_format_reward(pattern: str = THINK_ANSWER) -> Callable:
    """A reward: 1.0 when the whole completion (stripped) matches `pattern` (DOTALL), else 0.0."""
    try:
        regex = re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise ValueError(f"format reward pattern {pattern!r} is not a regular expression: {e}") from None

    def format_reward(prompts, completions, completion_ids=None, **columns) -> List[float]:
        return [float(regex.fullmatch(completion_text(c).strip()) is not None) for c in completions]

    return format_reward


format_reward = make_format_reward()

BUILT_IN = {"accuracy": accuracy_reward, "format": format_reward}


def load_reward_function(spec: str) -> Callable:
    """A built-in name ("accuracy", "format") or "FILE.py:NAME": the function NAME of the user's file."""
    if spec in BUILT_IN:
        return BUILT_IN[spec]
    path, sep, name = spec.rpartition(":")
    if not sep or not path.endswith(".py") or not name:
        raise ValueError(f"reward function {spec!r}: expected one of {sorted(BUILT_IN)} or FILE.py:NAME")
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"reward function {spec!r}: no file {path}")
    module_spec = importlib.util.spec_from_file_location(f"_reward_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)  # the user's own code, run as `python FILE.py` would
    fn = getattr(module, name, None)
    if fn is None:
        raise ValueError(f"reward function {spec!r}: {path} defines no {name}")
    if not callable(fn):
        raise ValueError(f"reward function {spec!r}: {path}:{name} is not callable (it is a {type(fn).__name__} value)")
    return fn
