"""Built-in GRPO rewards as a user sees them: a table of answers and formats, text and chat
completions, and the FILE.py:NAME loader's errors."""

from __future__ import annotations

import pytest

from train.rewards import accuracy_reward, format_reward, load_reward_function, make_format_reward

ANSWERS = [  # (completion, dataset answer, reward)
    ("so the total is \\boxed{1,000}", "1000", 1.0),
    ("The answer is 42.", 42, 1.0),
    ("The answer is 42.", "43", 0.0),
    ("first 3, then 7", "7", 1.0),
    ("first 3, then 7", "3", 0.0),
    ("$1,234.50 in all", "1234.5", 1.0),
    ("\\boxed{\\frac{1}{2}} though 5 is close", "5", 0.0),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),
    ("it is 3/4", "0.75", 1.0),
    ("x = -2", "-2.0000001", 1.0),
    ("x = -2", "-2.001", 0.0),
    ("no number here", "1", 0.0),
]


def test_accuracy_reward_table():
    completions = [c for c, _, _ in ANSWERS]
    got = accuracy_reward(["p"] * len(ANSWERS), completions, answer=[a for _, a, _ in ANSWERS])
    assert got == [r for _, _, r in ANSWERS]


def test_chat_completions_and_missing_answers():
    chat = [[{"role": "assistant", "content": "<think>6*7</think> <answer>\\boxed{42}</answer>"}],
            [{"role": "assistant", "content": "41"}]]
    assert accuracy_reward([[{"role": "user", "content": "6*7?"}]] * 2, chat, answer=["42", "42"]) == [1.0, 0.0]
    assert format_reward(None, chat) == [1.0, 0.0]
    assert accuracy_reward(["p"], ["42"]) == [None], "no answer column: not scored"
    assert accuracy_reward(["p", "q"], ["42", "1"], answer=[None, "1"]) == [None, 1.0]


@pytest.mark.parametrize("text, reward", [
    ("<think>a\nb</think>\n<answer>7</answer>", 1.0),
    ("  <think>x</think><answer>7</answer>\n", 1.0),
    ("<think>x</think> 7", 0.0),
    ("<answer>7</answer><think>x</think>", 0.0),
    ("<think>x</think><answer>7</answer> and more", 0.0),
])
def test_format_reward(text, reward):
    assert format_reward(["p"], [text]) == [reward]


def test_custom_format_and_loader(tmp_path):
    assert make_format_reward(r"#### \d+")(None, ["#### 12", "12"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="not a regular expression"):
        make_format_reward("(")
    file = tmp_path / "my_rewards.py"
    file.write_text("LIMIT = 3\ndef short(prompts, completions, **kw):\n"
                    "    return [float(len(c) < LIMIT) for c in completions]\n")
    assert load_reward_function(f"{file}:short")(None, ["ab", "abcd"]) == [1.0, 0.0]
    assert load_reward_function("accuracy") is accuracy_reward
    with pytest.raises(ValueError, match="defines no long"):
        load_reward_function(f"{file}:long")
    with pytest.raises(ValueError, match="LIMIT is not callable"):
        load_reward_function(f"{file}:LIMIT")
    with pytest.raises(ValueError, match="no file"):
        load_reward_function(f"{tmp_path / 'missing.py'}:f")
    with pytest.raises(ValueError, match="FILE.py:NAME"):
        load_reward_function("nonsense")
