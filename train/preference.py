"""Preference objectives (DPO, IPO, SimPO, ORPO): what one optimizer step of alignment minimises.

    objective = PreferenceObjective(loss="sigmoid", beta=0.1)   # DPO against the base (adapters off)
    n_pairs = sum(objective.count(b) for b in micro_batches)    # the step's normalisation, N
    loss_sum, metrics = objective(model, batch)                 # per micro-batch: backward(loss_sum / N)
    train_ds = precompute_reference_logps(model, train_ds)       # optional: the reference pass once

Batches are data.preference_collate's: 2B rows, the B chosen rows then the B rejected rows, labels
-100 off the responses. Chosen and rejected go through the model in one forward; each row's
response is scored by the sum of log p(token) over its labelled tokens (models.qwen's chunked
head, reduction="none": no [rows, T, vocab] logits).

Per pair, with π = the policy's summed log-prob of a response, ρ = the reference's, n = its
scored tokens, a = π / n (length-averaged), σ = sigmoid, ε = label_smoothing (the formulas of
TRL 1.16's DPOTrainer, and of its experimental CPOTrainer for SimPO and ORPOTrainer for ORPO):
  sigmoid (DPO):  z = β((π_c - ρ_c) - (π_r - ρ_r));  -(1 - ε) log σ(z) - ε log σ(-z)
                  (ε > 0: conservative DPO, as TRL < 1.0 and LLaMA-Factory's dpo_label_smoothing)
  ipo:            h = (π_c - ρ_c) / n_c - (π_r - ρ_r) / n_r;  (h - 1 / (2β))²
  simpo:          z = β(a_c - a_r) - γ;  -(1 - ε) log σ(z) - ε log σ(-z)        (no reference)
  orpo:           o = (a_c - a_r) - (log(1 - e^a_c) - log(1 - e^a_r));  -a_c - β log σ(o)   (no reference)
ORPO's first term is the mean NLL of the chosen response per pair (the ORPO paper's L_SFT, as
LLaMA-Factory computes it). TRL's ORPOTrainer instead takes the token mean over the whole
micro-batch, prompt tokens included; that would make the loss depend on how a step is split
into micro-batches, which the Trainer's pair normalisation rules out.

Metrics (TRL's names) are sums over the micro-batch's pairs, so the Trainer's division by N gives
TRL's means: rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies (chosen reward
> rejected reward), logps/chosen, logps/rejected. DPO / IPO: reward = β(π - ρ), logps = π.
SimPO / ORPO (as TRL logs them): reward = β a, logps = a. ORPO adds nll_loss, log_odds_ratio
(log σ(o)) and log_odds_chosen (o).

The reference costs no second model: with LoRA it is the same model under
lora.disable_adapters (the frozen base, NF4 or not) in no_grad, or log-probs computed once before
training by precompute_reference_logps and carried in the batch (ref_chosen_logps,
ref_rejected_logps). The base is the right reference for a fresh adapter (B = 0: the policy
starts as the base); to align an already-trained adapter further, precompute the reference with
the adapter on (disable_adapters=False), or merge it first (lora.merge) and train a new one.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import lora
from data.preference import REFERENCE_FIELDS, preference_collate

LOSSES = ("sigmoid", "ipo", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")
REFERENCES = ("adapters", "precomputed", None)
MODEL_INPUTS = ("attention_mask", "position_ids")


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, without cancellation on either side of -ln 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def sequence_logps(model: nn.Module, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(summed log p of each row's labelled tokens fp32 [rows], labelled tokens per row [rows])."""
    extras = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    nll, n_tokens = model(batch["input_ids"], labels=batch["labels"], reduction="none", **extras)
    return -nll, n_tokens


def pairs_in(batch: Dict[str, torch.Tensor]) -> int:
    """Pairs in a preference batch: half its rows."""
    rows = int(batch["input_ids"].shape[0])
    if rows % 2:
        raise ValueError(f"a preference batch holds chosen rows then rejected rows, so an even number of rows; "
                         f"got {rows} (collate with data.preference_collate)")
    return rows // 2


class PreferenceObjective:
    """One preference loss, following the Trainer's Objective protocol (see the module docstring).

    loss: "sigmoid" (DPO), "ipo", "simpo" or "orpo". beta: β (TRL's default 0.1; the SimPO paper
    uses 2-2.5). label_smoothing: ε for sigmoid and simpo. gamma: SimPO's target reward margin γ
    (TRL's simpo_gamma, default 0.5). reference: where ρ comes from, for sigmoid and ipo:
    "adapters" (the model with its LoRA adapters disabled, in no_grad), "precomputed" (the batch's
    ref_chosen_logps / ref_rejected_logps); "auto" = "adapters" for them, None for simpo / orpo
    (which use no reference).
    """

    unit = "pair"
    count_name = "pairs"
    example_name = "pairs"

    def __init__(self, loss: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0, gamma: float = 0.5,
                 reference: Optional[str] = "auto"):
        if loss not in LOSSES:
            raise ValueError(f"loss={loss!r}: expected one of {LOSSES}")
        if reference == "auto":
            reference = None if loss in REFERENCE_FREE else "adapters"
        if reference not in REFERENCES:
            raise ValueError(f"reference={reference!r}: expected one of {REFERENCES} or 'auto'")
        if loss in REFERENCE_FREE and reference is not None:
            raise ValueError(f"loss={loss!r} is reference-free: reference must be None, got {reference!r}")
        if loss not in REFERENCE_FREE and reference is None:
            raise ValueError(f"loss={loss!r} needs a reference: 'adapters' or 'precomputed'")
        if not (beta > 0 and math.isfinite(beta)):
            raise ValueError(f"beta must be a positive number, got {beta}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        if label_smoothing and loss not in ("sigmoid", "simpo"):
            raise ValueError(f"label_smoothing applies to the sigmoid and simpo losses, not {loss!r}")
        self.loss, self.beta, self.label_smoothing, self.gamma = loss, float(beta), float(label_smoothing), float(gamma)
        self.reference = reference

    def count(self, batch: Dict[str, torch.Tensor]) -> int:
        """Normalisation units of a micro-batch: its pairs."""
        return pairs_in(batch)

    def __call__(self, model: nn.Module, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """(sum of the pairs' losses, metric sums over the pairs); one policy forward of all 2B rows."""
        B = pairs_in(batch)
        # The reference pass first: its activations are gone before the policy's graph is built.
        ref_chosen, ref_rejected = self.reference_logps(model, batch) if self.reference is not None else (None, None)
        logps, n_tokens = sequence_logps(model, batch)
        if bool((n_tokens == 0).any()):
            row = int(torch.nonzero(n_tokens == 0)[0])
            raise ValueError(f"preference batch row {row} ({'chosen' if row < B else 'rejected'} of pair {row % B}) "
                             "has no labelled token: nothing to score")
        losses, metrics = self.pair_losses(logps[:B], logps[B:], n_tokens[:B], n_tokens[B:], ref_chosen, ref_rejected)
        return losses.sum(), {k: v.detach().sum() for k, v in metrics.items()}

    def reference_logps(self, model: nn.Module, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(ρ_c [B], ρ_r [B]) from the batch or from the model with its adapters disabled."""
        B = pairs_in(batch)
        if self.reference == "precomputed":
            missing = [k for k in REFERENCE_FIELDS if k not in batch]
            if missing:
                raise ValueError(f"reference='precomputed' but the batch has no {missing}: wrap the dataset with "
                                 "train.preference.precompute_reference_logps first")
            return batch["ref_chosen_logps"].float(), batch["ref_rejected_logps"].float()
        if not lora.has_adapters(model):
            raise ValueError("reference='adapters' needs a model with LoRA adapters (the reference is the model with "
                             "them disabled); without adapters use reference='precomputed'")
        with torch.no_grad(), lora.disable_adapters(model):
            logps, _ = sequence_logps(model, batch)
        return logps[:B], logps[B:]

    def pair_losses(self, chosen: torch.Tensor, rejected: torch.Tensor, n_chosen: torch.Tensor, n_rejected: torch.Tensor,
                    ref_chosen: Optional[torch.Tensor] = None, ref_rejected: Optional[torch.Tensor] = None):
        """Per-pair losses [B] and per-pair metrics {name: [B]} from summed log-probs [B] and token counts [B]."""
        beta, eps = self.beta, self.label_smoothing
        metrics: Dict[str, torch.Tensor] = {}
        if self.loss in ("sigmoid", "ipo"):
            chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
            if self.loss == "sigmoid":
                z = beta * (chosen_ratio - rejected_ratio)
                losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
            else:
                h = chosen_ratio / n_chosen.clamp_min(1) - rejected_ratio / n_rejected.clamp_min(1)
                losses = (h - 1 / (2 * beta)) ** 2
            chosen_reward, rejected_reward = beta * chosen_ratio, beta * rejected_ratio
            logged_chosen, logged_rejected = chosen, rejected
        else:
            chosen_avg, rejected_avg = chosen / n_chosen.clamp_min(1), rejected / n_rejected.clamp_min(1)
            if self.loss == "simpo":
                z = beta * (chosen_avg - rejected_avg) - self.gamma
                losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
            else:
                log_odds = (chosen_avg - rejected_avg) - (log1mexp(chosen_avg) - log1mexp(rejected_avg))
                ratio = F.logsigmoid(log_odds)
                losses = -chosen_avg - beta * ratio
                metrics.update({"nll_loss": -chosen_avg, "log_odds_ratio": ratio, "log_odds_chosen": log_odds})
            chosen_reward, rejected_reward = beta * chosen_avg, beta * rejected_avg
            logged_chosen, logged_rejected = chosen_avg, rejected_avg
        metrics.update({
            "rewards/chosen": chosen_reward,
            "rewards/rejected": rejected_reward,
            "rewards/margins": chosen_reward - rejected_reward,
            "rewards/accuracies": (chosen_reward > rejected_reward).float(),
            "logps/chosen": logged_chosen,
            "logps/rejected": logged_rejected,
        })
        return losses, metrics


class WithReferenceLogps(torch.utils.data.Dataset):
    """A preference dataset whose items also carry the reference's log-probs (scalar tensors)."""

    def __init__(self, dataset, ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor):
        if not len(dataset) == len(ref_chosen_logps) == len(ref_rejected_logps):
            raise ValueError(f"{len(dataset)} pairs but {len(ref_chosen_logps)} / {len(ref_rejected_logps)} "
                             "reference log-probs")
        self.dataset = dataset
        self.ref_chosen_logps = ref_chosen_logps.float().cpu()
        self.ref_rejected_logps = ref_rejected_logps.float().cpu()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = dict(self.dataset[i])
        item["ref_chosen_logps"] = self.ref_chosen_logps[i]
        item["ref_rejected_logps"] = self.ref_rejected_logps[i]
        return item

    def lengths(self) -> np.ndarray:
        return self.dataset.lengths()


@torch.no_grad()
def precompute_reference_logps(model: nn.Module, dataset: Sequence, batch_size: int = 8,
                               autocast_dtype: Optional[torch.dtype] = None, collate_fn=preference_collate,
                               disable_adapters: bool = True) -> WithReferenceLogps:
    """The reference's summed log-probs of every pair's responses, computed once, before training.

    disable_adapters=True: the reference is `model` with its LoRA adapters disabled (the base:
    what reference="adapters" computes, and what a fresh adapter starts from). False: the model
    as it is, for an adapter that does not start at zero (continuing a trained adapter: TRL's
    reference is then that starting adapter too); also the choice for full fine-tuning.
    autocast_dtype: run under torch.autocast as training does (None: the model's own dtype).
    Returns the dataset wrapped so that its items, and data.preference_collate's batches, carry
    ref_chosen_logps / ref_rejected_logps.
    """
    device = next(model.parameters()).device
    chosen, rejected = [], []
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    with (lora.disable_adapters(model) if disable_adapters else nullcontext()), autocast:
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = {k: v.to(device) for k, v in collate_fn(items).items()}
            logps, _ = sequence_logps(model, batch)
            chosen.append(logps[: len(items)].cpu())
            rejected.append(logps[len(items):].cpu())
    return WithReferenceLogps(dataset, torch.cat(chosen), torch.cat(rejected))
