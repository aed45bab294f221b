"""KTO (Ethayarajh et al. 2024) and unpaired APO-zero: TRL 1.16's KTOTrainer loss
(trl/trainer/kto_trainer.py, KTOTrainer._compute_loss), on per-sequence log-prob sums.

Each example is one completion labelled desirable or undesirable; π, ρ are the policy's and the
reference's summed log-probs of it, z = the KL baseline (kto_kl), σ = sigmoid:
    kto:                desirable:   w_d (1 - σ(β (π - ρ - z)))
                        undesirable: w_u (1 - σ(β (z - (π - ρ))))
    apo_zero_unpaired:  desirable:   w_d (1 - σ(β (π - ρ)))      undesirable: w_u σ(β (π - ρ))
The batch loss is the mean over its examples (TRL: losses.nanmean()).

z is estimated from mismatched pairs (each prompt with another example's completion): the mean
over the batch of (policy - reference) summed log-probs of those, detached, averaged over the
processes and clamped at 0. apo_zero_unpaired uses no KL term.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

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
