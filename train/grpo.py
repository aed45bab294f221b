"""The GRPO family's objective (GRPO, DAPO, Dr. GRPO, BNPO; GSPO = sequence-level importance
sampling): group advantages, the clipped policy loss and its metrics, as TRL 1.16's GRPOTrainer
defines them (trl/trainer/grpo_trainer.py: _generate_and_score_completions for the advantages,
_compute_loss for the loss and metrics).

    per_function = reward_table(functions, prompts, completions, **columns)   # [B*G, F], None -> NaN
    rewards = weighted_rewards(per_function, weights)            # [B*G]; NaN: no function scored it
    advantages = group_advantages(rewards, G, "group")           # [B*G]
    logps, entropies = completion_logps(model, ids, mask, n_prompt, temperature)   # [B, C] each
    loss, metrics = grpo_loss(logps, old_logps, ref_logps, advantages, completion_mask, ...)

Per completion token t of row i, with r = exp(logp - old) (token level) or r_i = exp(mean_t(logp -
old)) (sequence level, GSPO), A_i the advantage and ρ the reference's log-prob:
    ℓ_it = -min(r A_i, clip(r, 1 - ε, 1 + ε_high) A_i) + β (exp(ρ - logp) - (ρ - logp) - 1)
and the loss normalises Σ mask·ℓ by loss_type (TRL 1.16's definitions, per micro-batch):
    grpo:    mean over rows of (Σ_t mask ℓ / Σ_t mask), / grad_accum
    bnpo:    Σ mask ℓ / Σ mask (the micro-batch's tokens), / grad_accum
    dr_grpo: Σ mask ℓ / (B · max_completion_length), / grad_accum
    dapo:    Σ mask ℓ / num_items_in_batch (the completion tokens of the whole accumulated batch,
             all micro-batches and processes: TRL's normaliser with steps_per_generation =
             grad_accum, one process); the default, as GRPOConfig.loss_type.
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch.utils.checkpoint import checkpoint

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")
IMPORTANCE_LEVELS = ("token", "sequence")
SCALE_REWARDS = ("group", "batch", "none")
STD_EPS = 1e-4  # TRL adds it to the std before dividing


# ---------------------------------------------------------------------- rewards -> advantages
def nanstd(x: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Unbiased std ignoring NaNs (NaN where fewer than two values), as trl.trainer.utils.nanstd."""
    keep = dict(dim=dim, keepdim=True) if dim is not None else {}
    mean = torch.nanmean(x, **keep)
    var = torch.nanmean((x - mean) ** 2, **keep)
    count = (~torch.isnan(x)).sum(**keep) if dim is not None else (~torch.isnan(x)).sum()
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(count, float("nan"), dtype=var.dtype))
    std = torch.sqrt(var * correction)
    return std.squeeze(dim) if dim is not None else std


def reward_table(functions: Sequence[Callable], prompts: Sequence, completions: Sequence,
                 completion_ids: Optional[Sequence] = None, **columns) -> torch.Tensor:
    """[N, F] fp32 rewards of N completions by F reward functions (None -> NaN), as TRL calls them:
    fn(prompts=..., completions=..., completion_ids=..., **columns) -> N floats or Nones.

    A completion that no function scored (all None) gets a warning naming it, as TRL logs one.
    """
    table = torch.zeros(len(completions), len(functions))
    for j, fn in enumerate(functions):
        name = getattr(fn, "__name__", type(fn).__name__)
        out = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        if len(out) != len(completions):
            raise ValueError(f"reward function {name!r} returned {len(out)} rewards for {len(completions)} "
                             "completions: it must return one per completion")
        table[:, j] = torch.tensor([float("nan") if r is None else float(r) for r in out], dtype=torch.float32)
    unscored = torch.isnan(table).all(1)
    if len(functions) and unscored.any():
        i = int(unscored.nonzero()[0])
        warnings.warn(f"every reward function returned None for completion {i} (prompt {prompts[i]!r:.80}, "
                      f"completion {completions[i]!r:.80}): it gets advantage 0", stacklevel=2)
    return table


def weighted_rewards(per_function: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[N, F] rewards of F functions (NaN where a function returned None) -> [N] weighted sums.

    NaN entries are skipped (nansum); a row where every function returned None is NaN (TRL logs a
    warning for it), and group_advantages gives it advantage 0 and leaves it out of its group's
    mean and std.
    """
    if per_function.dim() != 2:
        raise ValueError("per_function rewards must be [completions, functions], "
                         f"got shape {tuple(per_function.shape)}")
    F_ = per_function.shape[1]
    weights = torch.ones(F_) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    if weights.shape != (F_,):
        raise ValueError(f"{weights.numel()} reward weights for {F_} reward functions")
    rewards = (per_function * weights.to(per_function)[None]).nansum(1)
    rewards[torch.isnan(per_function).all(1)] = float("nan")
    return rewards


def group_advantages(rewards: torch.Tensor, G: int, scale_rewards: str = "group") -> torch.Tensor:
    """[B*G] rewards (G consecutive completions per prompt; NaN = unscorable) -> [B*G] advantages.

    A = (r - mean of its group) / (std + 1e-4), with the unbiased std of its group ("group") or of
    the whole batch ("batch"), or A = r - mean ("none"); NaNs are ignored in means and stds and
    their advantage is 0. A group of one has std 0.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale_rewards!r}: expected one of {SCALE_REWARDS}")
    if rewards.dim() != 1 or G < 1 or rewards.numel() % G:
        raise ValueError(f"rewards must be [prompts * G] with G={G}, got shape {tuple(rewards.shape)}")
    groups = rewards.view(-1, G)
    mean = torch.nanmean(groups, dim=1).repeat_interleave(G)
    if scale_rewards == "batch":
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:
        std = nanstd(groups, dim=1).repeat_interleave(G) if G > 1 else torch.zeros_like(rewards)
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + STD_EPS)
    return torch.nan_to_num(advantages, nan=0.0)


# ---------------------------------------------------------------------- the loss
def grpo_loss(
    logps: torch.Tensor,
    old_logps: Optional[torch.Tensor],
    ref_logps: Optional[torch.Tensor],
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    epsilon: float = 0.2,
    epsilon_high: Optional[float] = None,
    beta: float = 0.0,
    max_completion_length: Optional[int] = None,
    num_items_in_batch: Optional[float] = None,
    grad_accum: int = 1,
    entropies: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """(loss, metrics) of one micro-batch, as TRL 1.16's GRPOTrainer._compute_loss.

    logps [B, C]: the policy's log-probs of the completion tokens (with grad); old_logps [B, C]:
    those of the policy that sampled them (None: logps.detach(), num_iterations = 1); ref_logps
    [B, C]: the reference's (needed when beta > 0); advantages [B]; mask [B, C] (1 = completion
    token). epsilon_high: None = epsilon. max_completion_length: dr_grpo's constant.
    num_items_in_batch: dapo's normaliser (see the module docstring). grad_accum: TRL's
    current_gradient_accumulation_steps, which grpo / bnpo / dr_grpo divide by.
    entropies [B, C] (optional): per-token entropies, for the "entropy" metric.
    Metrics (TRL's names, one process): clip_ratio/low_mean, high_mean, region_mean (token means;
    sequence means at sequence level), low_min, high_max (over rows), kl (beta > 0), entropy.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: expected one of {LOSS_TYPES}")
    if importance_sampling_level not in IMPORTANCE_LEVELS:
        raise ValueError(f"importance_sampling_level={importance_sampling_level!r}: "
                         f"expected one of {IMPORTANCE_LEVELS}")
    if beta != 0.0 and ref_logps is None:
        raise ValueError(f"beta={beta} needs the reference's log-probs (ref_logps)")
    if loss_type == "dr_grpo" and not max_completion_length:
        raise ValueError("loss_type='dr_grpo' normalises by max_completion_length: pass it")
    if loss_type == "dapo" and num_items_in_batch is None:
        raise ValueError("loss_type='dapo' normalises by num_items_in_batch (completion tokens of the whole "
                         "accumulated batch): pass it")
    eps_low, eps_high = epsilon, epsilon if epsilon_high is None else epsilon_high
    mask = mask.to(logps.dtype)
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    old = logps.detach() if old_logps is None else old_logps
    log_ratio = logps - old
    if importance_sampling_level == "token":
        log_w = log_ratio
    else:
        log_w = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]
    ratio = torch.exp(log_w)
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
    if beta != 0.0:
        d = ref_logps - logps
        kl = torch.exp(d) - d - 1
        per_token = per_token + beta * kl
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / grad_accum
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0) / grad_accum
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (per_token.shape[0] * max_completion_length) / grad_accum
    else:
        loss = (per_token * mask).sum() / torch.as_tensor(num_items_in_batch, dtype=logps.dtype).clamp(min=1.0)
    metrics = _metrics(ratio.detach(), adv, mask, eps_low, eps_high)
    if beta != 0.0:
        metrics["kl"] = _masked_mean(kl.detach(), mask)
    if entropies is not None:
        metrics["entropy"] = _masked_mean(entropies.detach(), mask)
    return loss, metrics


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token mean over the mask ([B, C]), or the row mean of a [B, 1] per-sequence value."""
    if x.shape[1] == 1:
        return x.sum() / max(x.shape[0], 1)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def _metrics(ratio, adv, mask, eps_low, eps_high) -> Dict[str, torch.Tensor]:
    low = ((ratio < 1 - eps_low) & (adv < 0)).to(mask.dtype)
    high = ((ratio > 1 + eps_high) & (adv > 0)).to(mask.dtype)
    region = torch.maximum(low, high)

    def seq_mean(x):  # TRL's masked_seq_mean: NaN for a row without tokens (skipped by nanmin/nanmax)
        return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)

    low_rows, high_rows = seq_mean(low), seq_mean(high)
    return {
        "clip_ratio/low_mean": _masked_mean(low, mask),
        "clip_ratio/high_mean": _masked_mean(high, mask),
        "clip_ratio/region_mean": _masked_mean(region, mask),
        "clip_ratio/low_min": low_rows[~torch.isnan(low_rows)].min() if (~torch.isnan(low_rows)).any()
        else torch.tensor(float("nan")),
        "clip_ratio/high_max": high_rows[~torch.isnan(high_rows)].max() if (~torch.isnan(high_rows)).any()
        else torch.tensor(float("nan")),
    }


# ---------------------------------------------------------------------- log-probs of completions
TOKENS_PER_CHUNK = 256  # completion positions whose logits exist at once ([chunk, vocab] fp32)


def _head_logps_entropy(head, h: torch.Tensor, targets: torch.Tensor, temperature: float, offset):
    """log softmax(head(h) / T)[target] and the entropy of softmax(head(h) / T), fp32 [n] each."""
    logits = head(h).float()
    if offset is not None:
        logits = logits + offset
    logp_all = torch.log_softmax(logits / temperature, dim=-1)
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def completion_logps(model, ids: torch.Tensor, mask: torch.Tensor, n_prompt: int, temperature: float = 1.0,
                     chunk_tokens: int = TOKENS_PER_CHUNK) -> Tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, entropies) of the completion tokens, fp32 [B, C] each, 0 off the mask.

    ids [B, n_prompt + C] (prompts left-padded to n_prompt, completions after them), mask [B,
    n_prompt + C] (1 = real token). Token t is scored by log softmax(logits_{t-1} / temperature)
    as TRL does (logits divided by the sampling temperature). The head runs over chunk_tokens
    completion positions at a time, each chunk under activation checkpointing: no more than one
    chunk's [chunk, vocab] logits exist at once, in forward or backward.
    """
    if ids.shape != mask.shape:
        raise ValueError(f"ids {tuple(ids.shape)} and mask {tuple(mask.shape)} differ in shape")
    if not 0 < n_prompt < ids.shape[1]:
        raise ValueError(f"n_prompt={n_prompt}: expected 0 < n_prompt < sequence length {ids.shape[1]}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    hidden = model.hidden_states(ids, attention_mask=mask)
    head = getattr(model.lm_head, "active", model.lm_head)
    offset = getattr(model, "logit_offset", None)
    completion = mask[:, n_prompt:].bool()
    h = hidden[:, n_prompt - 1 : -1][completion]
    targets = ids[:, n_prompt:][completion]
    pieces = []
    for s in range(0, h.shape[0], chunk_tokens):
        args = (head, h[s : s + chunk_tokens], targets[s : s + chunk_tokens], temperature, offset)
        if torch.is_grad_enabled() and h.requires_grad:
            pieces.append(checkpoint(_head_logps_entropy, *args, use_reentrant=False))
        else:
            pieces.append(_head_logps_entropy(*args))
    logp = torch.cat([p[0] for p in pieces]) if pieces else h.new_zeros(0, dtype=torch.float32)
    ent = torch.cat([p[1] for p in pieces]) if pieces else h.new_zeros(0, dtype=torch.float32)
    out_logp = logp.new_zeros(completion.shape).masked_scatter(completion, logp)
    out_ent = ent.new_zeros(completion.shape).masked_scatter(completion, ent)
    return out_logp, out_ent
