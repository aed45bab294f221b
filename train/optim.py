"""AdamW with decoupled weight decay, written out: one multi-tensor (foreach) update per group.

    groups = param_groups(model, weight_decay=0.1)      # biases, norms, 1-D params at wd 0
    opt = AdamW(groups, lr=1e-4, betas=(0.9, 0.999), eps=1e-8)

The update is Loshchilov & Hutter's AdamW exactly as torch.optim.AdamW computes it
(decay first, then the bias-corrected Adam step), so the two agree to rounding:

    p      <- p * (1 - lr * wd)
    m      <- beta1 * m + (1 - beta1) * g
    v      <- beta2 * v + (1 - beta2) * g^2
    p      <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

State is always fp32. A parameter stored in bf16/fp16 also gets an fp32 master copy in its
state ("master"): the update is applied to the master and rounded once into the parameter,
so small updates are not lost to bf16's 8-bit mantissa step after step.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn



class AdamW(torch.optim.Optimizer):
    """Decoupled-weight-decay Adam; per-group lr, betas, eps, weight_decay.

    state per parameter: step (fp32 scalar tensor), exp_avg / exp_avg_sq (fp32, param shape),
    master (fp32 copy, only for low-precision parameters).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        foreach: bool = True,
    ):
        if not lr >= 0.0:
            raise ValueError(f"AdamW: lr must be >= 0, got {lr!r}")
        if not eps >= 0.0:
            raise ValueError(f"AdamW: eps must be >= 0, got {eps!r}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"AdamW: betas must be two numbers in [0, 1), got {betas!r}")
        if not weight_decay >= 0.0:
            raise ValueError(f"AdamW: weight_decay must be >= 0, got {weight_decay!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, foreach=foreach)
        super().__init__(params, defaults)

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            if p.dtype != torch.float32:
                state["master"] = p.detach().to(torch.float32).clone()
        return state

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient; returns closure's loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, masters, exp_avgs, exp_avg_sqs, steps = [], [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW does not support sparse gradients")
                state = self._init_state(p)
                params.append(p)
                grads.append(p.grad if p.grad.dtype == torch.float32 else p.grad.float())
                masters.append(state.get("master", p))
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            if not params:
                continue
            update = _foreach_update if group["foreach"] else _single_update
            update(masters, grads, exp_avgs, exp_avg_sqs, steps, group)
            # Low-precision parameters: round the fp32 master once into the stored weight.
            for p, m in zip(params, masters):
                if m is not p:
                    p.copy_(m)
        return loss


def _hyper(group: dict, step: float) -> tuple[float, float, float]:
    """(decay factor, step size, sqrt of the second-moment bias correction) at step t."""
    lr, wd = group["lr"], group["weight_decay"]
    beta1, beta2 = group["betas"]
    return 1.0 - lr * wd, lr / (1.0 - beta1**step), math.sqrt(1.0 - beta2**step)


def _foreach_update(params, grads, exp_avgs, exp_avg_sqs, steps, group) -> None:
    """Multi-tensor AdamW step over lists of fp32 tensors (params are the fp32 masters)."""
    beta1, beta2 = group["betas"]
    torch._foreach_add_(steps, 1.0)
    # Every tensor of a group has seen the same number of steps unless one was frozen for a
    # while; group by step count so each bucket shares its bias corrections.
    buckets: dict[float, list[int]] = {}
    for i, s in enumerate(steps):
        buckets.setdefault(float(s.item()), []).append(i)
    for t, idx in buckets.items():
        ps = [params[i] for i in idx]
        gs = [grads[i] for i in idx]
        ms = [exp_avgs[i] for i in idx]
        vs = [exp_avg_sqs[i] for i in idx]
        decay, step_size, bc2_sqrt = _hyper(group, t)
        if group["weight_decay"] != 0.0:
            torch._foreach_mul_(ps, decay)
        torch._foreach_lerp_(ms, gs, 1.0 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, gs, gs, value=1.0 - beta2)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, group["eps"])
        torch._foreach_addcdiv_(ps, ms, denom, value=-step_size)


def _single_update(params, grads, exp_avgs, exp_avg_sqs, steps, group) -> None:
    """The same step one tensor at a time (reference path; foreach=False)."""
    beta1, beta2 = group["betas"]
    for p, g, m, v, s in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        s.add_(1.0)
        decay, step_size, bc2_sqrt = _hyper(group, float(s.item()))
        if group["weight_decay"] != 0.0:
            p.mul_(decay)
        m.lerp_(g, 1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        p.addcdiv_(m, (v.sqrt() / bc2_sqrt).add_(group["eps"]), value=-step_size)


def no_decay(name: str, param: torch.Tensor) -> bool:
    """Biases, norm weights and every other 1-D (or 0-D) parameter take no weight decay."""
    leaf = name.rsplit(".", 1)[-1]
    return param.dim() < 2 or leaf == "bias" or "norm" in name.lower()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters of `model` in two groups: {"params", "weight_decay", "names"}.

    Group 0 decays (matrices, embeddings, LoRA A/B); group 1 (biases, norms, 1-D) has wd 0.
    A shared (tied) parameter appears once. Empty groups are left out.
    """
    decay, keep = ([], []), ([], [])
    for name, p in model.named_parameters():  # named_parameters yields a shared tensor once
        if not p.requires_grad:
            continue
        names, params = keep if no_decay(name, p) else decay
        names.append(name)
        params.append(p)
    groups = []
    if decay[1]:
        groups.append({"params": decay[1], "names": decay[0], "weight_decay": float(weight_decay)})
    if keep[1]:
        groups.append({"params": keep[1], "names": keep[0], "weight_decay": 0.0})
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameters (all requires_grad=False)")
    return groups
