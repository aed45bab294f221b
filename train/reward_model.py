"""Reward models: the Bradley-Terry objective (TRL 1.16's RewardTrainer) and a trained folder as a
GRPO reward function (TRL's GRPOTrainer with a reward model).

    objective = RewardObjective(center_rewards_coefficient=0.01)   # the Trainer's Objective protocol
    loss_sum, metrics = objective(clf, batch)                      # batch: data.preference_collate's
    fn = reward_function("runs/rm/merged", device="cpu")           # -> list[float], TRL's calling convention
    fn(prompts=[...], completions=[...], completion_ids=[...])

Per pair, with r_c, r_r the scores (logits[:, 0]) of the chosen and rejected rows and m the pair's
margin (0 without TRL's "margin" column):
    loss = -log σ(r_c - r_r - m) + c (r_c + r_r)²        c = center_rewards_coefficient (None: no term)
summed over the pairs; the Trainer divides by the pairs of the whole optimizer step, so one
micro-batch gives TRL's `-logsigmoid(...).mean() + c * mean((r_c + r_r)**2)` exactly, and no split
of a step changes it. Metrics (TRL's names, means over the pairs): accuracy (r_c > r_r), margin
(r_c - r_r), mean_reward (the mean of all 2B scores). TRL's min_reward / max_reward are not
logged: the Trainer reduces metrics as sums over units.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .preference import pairs_in


def scores(model: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """fp32 [rows]: each row's reward, the classifier's first logit."""
    out = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))
    return out[:, 0].float()


class RewardObjective:
    """The Bradley-Terry loss of a sequence classifier on preference batches (module docstring)."""

    unit = "pair"
    count_name = "pairs"
    example_name = "pairs"

    def __init__(self, center_rewards_coefficient: Optional[float] = None):
        if center_rewards_coefficient is not None and not center_rewards_coefficient >= 0:
            raise ValueError(f"center_rewards_coefficient must be >= 0 or None, got {center_rewards_coefficient}")
        self.center_rewards_coefficient = center_rewards_coefficient

    def count(self, batch: Dict[str, torch.Tensor]) -> int:
        return pairs_in(batch)

    def __call__(self, model: nn.Module, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """(sum of the pairs' losses, metric sums over the pairs); one forward of all 2B rows."""
        B = pairs_in(batch)
        r = scores(model, batch)
        losses, metrics = self.pair_losses(r[:B], r[B:], batch.get("margin"))
        return losses.sum(), {k: v.detach().sum() for k, v in metrics.items()}

    def pair_losses(self, chosen: torch.Tensor, rejected: torch.Tensor, margin: Optional[torch.Tensor] = None):
        """Per-pair losses [B] and metrics {name: [B]} from the scores [B] of the two rows."""
        diff = chosen - rejected
        losses = -F.logsigmoid(diff if margin is None else diff - margin.to(diff))
        if self.center_rewards_coefficient is not None:
            losses = losses + self.center_rewards_coefficient * (chosen + rejected) ** 2
        metrics = {"accuracy": (chosen > rejected).float(), "margin": diff, "mean_reward": (chosen + rejected) / 2}
        return losses, metrics


# ---------------------------------------------------------------------- a folder as a GRPO reward
def _is_conversational(prompt: Any) -> bool:
    """TRL's is_conversational on a prompt: a list of {"role", "content"} messages."""
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict) and "role" in prompt[0]


def reward_function(folder, *, device: str = "cpu", dtype: str = "fp32", batch_size: int = 8,
                    chat_template_kwargs: Optional[dict] = None) -> Callable[..., List[float]]:
    """A trained reward model folder (a ...ForSequenceClassification checkpoint) as a reward function.

    Called as TRL calls reward functions, fn(prompts=..., completions=..., completion_ids=...,
    **columns) -> list[float], it scores as TRL's GRPOTrainer scores with a reward model:
    conversational prompts: prompt + completion messages rendered with the folder's own chat
    template (no generation prompt); text: prompt + completion concatenated; tokenized without
    special tokens, right-padded with the pad token, logits[:, 0] under no_grad. The function's
    __name__ is the folder's name (GRPO's metric rewards/<name>/mean).
    """
    from models.qwen import load
    from models.qwen.config import dtype_from_name
    from models.qwen.score import QwenForSequenceClassification
    from models.qwen.special_tokens import ENDOFTEXT_ID
    from models.qwen.tokenizer import load_tokenizer

    root = Path(folder)
    model = load(root, dtype=dtype_from_name(dtype), device=device)
    if not isinstance(model, QwenForSequenceClassification):
        raise ValueError(f"{root}: not a reward model (config.json architectures {model.config.family.architecture!r}; "
                         "expected a ...ForSequenceClassification folder, e.g. examples/reward.py's merged/)")
    tok, _ = load_tokenizer(root)
    if model.config.pad_token_id is None:   # TRL: pad = the tokenizer's pad, else its eos
        model.config.pad_token_id = ENDOFTEXT_ID
    pad = model.config.pad_token_id
    template_kwargs = dict(chat_template_kwargs or {})

    def text_of(prompt, completion) -> str:
        if _is_conversational(prompt):
            return tok.apply_chat_template(list(prompt) + list(completion), tokenize=False, **template_kwargs)
        return prompt + completion

    @torch.no_grad()
    def score(prompts: Sequence, completions: Sequence, completion_ids=None, **columns) -> List[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        rows = [tok.encode(text_of(p, c), allowed_special="all") for p, c in zip(prompts, completions)]
        out: List[float] = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            width = max(len(r) for r in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, r in enumerate(chunk):
                ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
                mask[i, :len(r)] = 1
            logits = model(ids.to(device), attention_mask=mask.to(device))
            out.extend(float(v) for v in logits[:, 0].float().cpu())
        return out

    score.__name__ = root.resolve().name
    score.model = model
    return score
