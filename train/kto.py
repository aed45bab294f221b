"""KTO (Ethayarajh et al. 2024) and unpaired APO-zero: TRL 1.16's KTOTrainer loss
(trl/trainer/kto_trainer.py, KTOTrainer._compute_loss), on per-sequence log-prob sums.

Each example is one completion labelled desirable or undesirable; π, ρ are the policy's and the
reference's summed log-probs of it, z = the KL baseline (kto_kl), σ = sigmoid:
    kto:                desirable:   w_d (1 - σ(β (π - ρ - z)))
                        undesirable: w_u (1 - σ(β (z - (π - ρ))))
    apo_zero_unpaired:  desirable:   w_d (1 - σ(β (π - ρ)))      undesirable: w_u σ(β (π - ρ))
The batch loss is the mean over its examples (TRL: losses.nanmean()). KTOObjective (below) is the
whole objective for train.loop.Trainer: the reference (adapters off) and the KL rows of a batch.

z is estimated from mismatched pairs (each prompt with another example's completion): the mean
over the batch of (policy - reference) summed log-probs of those, detached, averaged over the
processes and clamped at 0. apo_zero_unpaired uses no KL term.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

import lora

from .preference import sequence_logps

KTO_LOSSES = ("kto", "apo_zero_unpaired")


def kto_kl(policy_kl_logps: torch.Tensor, reference_kl_logps: torch.Tensor,
           all_reduce_mean: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """z = max(0, mean(policy_kl_logps - reference_kl_logps)), detached; [B] inputs -> scalar.

    all_reduce_mean: averages a scalar over the processes (TRL: gather_for_metrics(kl).mean());
    None = one process.
    """
    kl = (policy_kl_logps - reference_kl_logps).mean().detach()
    if all_reduce_mean is not None:
        kl = all_reduce_mean(kl)
    return kl.clamp(min=0)


def kto_loss(policy_logps: torch.Tensor, reference_logps: torch.Tensor, desirable: torch.Tensor,
             kl: Optional[torch.Tensor] = None, *, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0, loss_type: str = "kto") -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """(per-example weighted losses [B], metrics) from summed log-probs [B] and labels [B] bool.

    kl: kto_kl's z (needed for loss_type="kto"). Metrics (TRL's, one process): rewards/chosen,
    rewards/rejected, logps/chosen, logps/rejected (means over the desirable / undesirable
    examples, absent when there are none), rewards/margins (when both are there), kl.
    """
    if loss_type not in KTO_LOSSES:
        raise ValueError(f"loss_type={loss_type!r}: expected one of {KTO_LOSSES}")
    if loss_type == "kto" and kl is None:
        raise ValueError("loss_type='kto' needs the KL baseline kl (train.kto.kto_kl of the mismatched pairs)")
    if not (policy_logps.shape == reference_logps.shape == desirable.shape) or policy_logps.dim() != 1:
        raise ValueError(f"policy_logps {tuple(policy_logps.shape)}, reference_logps {tuple(reference_logps.shape)} "
                         f"and desirable {tuple(desirable.shape)} must be the same [B]")
    desirable = desirable.bool()
    kl = torch.zeros((), dtype=policy_logps.dtype, device=policy_logps.device) if kl is None else kl
    logratio = policy_logps - reference_logps
    if loss_type == "kto":
        good = 1 - F.sigmoid(beta * (logratio - kl))
        bad = 1 - F.sigmoid(beta * (kl - logratio))
    else:
        good = 1 - F.sigmoid(beta * logratio)
        bad = F.sigmoid(beta * logratio)
    losses = torch.where(desirable, desirable_weight * good, undesirable_weight * bad)
    rewards = beta * logratio.detach()
    metrics = {"kl": kl.detach()}
    for name, rows in (("chosen", desirable), ("rejected", ~desirable)):
        if rows.any():
            metrics[f"rewards/{name}"] = rewards[rows].mean()
            metrics[f"logps/{name}"] = policy_logps.detach()[rows].mean()
    if desirable.any() and not desirable.all():
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return losses, metrics


class KTOObjective:
    """KTO / unpaired APO-zero as a train.loop.Trainer objective (train.objective's protocol).

    Batches are data.kto_collate's: B rows (input_ids, labels, attention_mask, label) and, for
    loss_type="kto", their mismatched KL rows (kl_input_ids, kl_labels, kl_attention_mask). The
    unit is an example (a row): count(batch) = B, and the call returns the sum of the B weighted
    losses, so the Trainer's division by the step's rows gives TRL's mean (losses.nanmean()) over
    equal micro-batches. The reference is the model with its LoRA adapters disabled (no_grad), as
    in DPO. As in TRL 1.16, z comes from each micro-batch's own KL rows: the policy's and the
    reference's summed log-probs of them under no_grad, mean over the rows, averaged over the
    processes while training (torch.distributed, TRL's gather_for_metrics(kl).mean()), clamped at 0.

    Metrics: sums whose means (metric_means) are TRL 1.16's logged names: rewards/chosen,
    rewards/rejected, logps/chosen, logps/rejected (means over the desirable / undesirable rows of
    the step; absent when it has none), rewards/margins (when it has both), kl (the mean of the
    micro-batches' z, weighted by rows), and count/chosen, count/rejected (rows of each label).
    """

    unit = "example"
    count_name = "examples"
    example_name = "examples"
    _SUMS = ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")

    def __init__(self, loss_type: str = "kto", beta: float = 0.1, desirable_weight: float = 1.0,
                 undesirable_weight: float = 1.0):
        if loss_type not in KTO_LOSSES:
            raise ValueError(f"loss_type={loss_type!r}: expected one of {KTO_LOSSES}")
        for name, value in (("beta", beta), ("desirable_weight", desirable_weight),
                            ("undesirable_weight", undesirable_weight)):
            if not (value > 0 and value < float("inf")):
                raise ValueError(f"{name} must be a positive number, got {value}")
        self.loss_type, self.beta = loss_type, float(beta)
        self.desirable_weight, self.undesirable_weight = float(desirable_weight), float(undesirable_weight)

    def count(self, batch: Dict[str, torch.Tensor]) -> int:
        return int(batch["input_ids"].shape[0])

    def __call__(self, model, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        if not lora.has_adapters(model):
            raise ValueError("KTO's reference is the model with its LoRA adapters disabled: the model has none")
        main = {k: batch[k] for k in ("input_ids", "labels", "attention_mask") if k in batch}
        desirable = batch["label"].bool()
        kl = None
        if self.loss_type == "kto":
            kl_rows = {"input_ids": batch["kl_input_ids"], "labels": batch["kl_labels"],
                       "attention_mask": batch["kl_attention_mask"]}
            with torch.no_grad():
                policy_kl, _ = sequence_logps(model, kl_rows)
                with lora.disable_adapters(model):
                    reference_kl, _ = sequence_logps(model, kl_rows)
            kl = kto_kl(policy_kl, reference_kl, _all_reduce_mean if model.training else None)
        with torch.no_grad(), lora.disable_adapters(model):
            reference, _ = sequence_logps(model, main)
        policy, n_tokens = sequence_logps(model, main)
        if bool((n_tokens == 0).any()):
            row = int(torch.nonzero(n_tokens == 0)[0])
            raise ValueError(f"KTO batch row {row} has no labelled completion token: nothing to score")
        losses, _ = kto_loss(policy, reference, desirable, kl, beta=self.beta, desirable_weight=self.desirable_weight,
                             undesirable_weight=self.undesirable_weight, loss_type=self.loss_type)
        rewards, logps = self.beta * (policy - reference).detach(), policy.detach()
        chosen = desirable.to(rewards.dtype)
        metrics = {"rewards/chosen": (rewards * chosen).sum(), "rewards/rejected": (rewards * (1 - chosen)).sum(),
                   "logps/chosen": (logps * chosen).sum(), "logps/rejected": (logps * (1 - chosen)).sum(),
                   "count/chosen": chosen.sum(), "count/rejected": (1 - chosen).sum(),
                   "kl": (kl if kl is not None else torch.zeros(())) * len(desirable)}
        return losses.sum(), metrics

    def metric_means(self, sums: Dict[str, float], count: int) -> Dict[str, float]:
        """TRL's logged values from a step's (or an evaluation's) metric sums over `count` rows."""
        if not sums:
            return {}
        out = {"kl": sums["kl"] / count, "count/chosen": sums["count/chosen"], "count/rejected": sums["count/rejected"]}
        for name in self._SUMS:
            n = sums["count/" + name.split("/")[1]]
            if n > 0:
                out[name] = sums[name] / n
        if "rewards/chosen" in out and "rewards/rejected" in out:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out


def _all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over the processes (one process: itself)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()
