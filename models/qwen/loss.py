"""Output head + cross-entropy in chunks, never materialising full fp32 logits.

With Qwen's 151936-row vocabulary, the logits of a 2048-token sequence are 1.2 GB in fp32,
and autograd would keep them (plus the softmax) alive until backward. Here the head and the
loss are computed chunk by chunk over the supervised positions only, and the gradients with
respect to the hidden states (and the head weight, when it is trainable) are produced during
the forward pass, so peak memory is one chunk of logits.
"""

from __future__ import annotations

import torch

from .linear import upcast_matmul_dtype

IGNORE_INDEX = -100

# Logit elements per chunk (fp32): 32M elements = 128 MB, about 220 tokens of Qwen's vocab.
CHUNK_ELEMENTS = 32 * 1024 * 1024


class _LinearCrossEntropySum(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i); hidden [N, H], weight [V, H], target [N]."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, matmul_dtype):
        # matmul_dtype=float32: bf16 operands multiplied by fp32 kernels, products rounded to
        # bf16 (same function as a bf16 GEMM; see linear.py). None: operands' own dtype.
        w_mm = weight.to(matmul_dtype) if matmul_dtype is not None else weight
        need_h = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[1]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]
            t = targets[start : start + chunk]
            if matmul_dtype is not None:
                logits = (h.to(matmul_dtype) @ w_mm.t()).to(hidden.dtype).float()
            else:
                logits = (h @ weight.t()).float()  # [n, V] in fp32, like the reference's .float()
            lse = torch.logsumexp(logits, dim=-1)
            loss += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if need_h or need_w:
                # d(sum CE)/d(logits) = softmax - onehot, computed in place on the chunk.
                probs = logits.sub_(lse[:, None]).exp_()
                probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                g = probs.to(hidden.dtype)
                if need_h:
                    gh = g.to(matmul_dtype) @ w_mm if matmul_dtype is not None else g @ weight
                    grad_h[start : start + chunk] = gh
                if need_w:
                    grad_w += g.t().float() @ h.float()
        ctx.save_for_backward(*(x for x in (grad_h, grad_w) if x is not None))
        ctx.has = (need_h, need_w)
        ctx.w_dtype = weight.dtype
        ctx.h_dtype = hidden.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        saved = list(ctx.saved_tensors)
        need_h, need_w = ctx.has
        grad_h = saved.pop(0) * grad_out.to(ctx.h_dtype) if need_h else None
        grad_w = (saved.pop(0) * grad_out.float()).to(ctx.w_dtype) if need_w else None
        return grad_h, grad_w, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token loss and the number of supervised tokens.

    hidden [B, T, H] (final-norm output), weight [V, H] (the output head), labels [B, T]
    aligned with the inputs (shifted here: position t predicts labels[t + 1]); -100 = ignore.
    Returns (loss_sum fp32 scalar, n_tokens int64 scalar).
    """
    targets = labels[:, 1:].reshape(-1)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    keep = targets != IGNORE_INDEX
    n_tokens = keep.sum()
    h, targets = h[keep], targets[keep]  # only supervised positions reach the head
    if (targets < 0).any() or (targets >= weight.shape[0]).any():
        bad = targets[(targets < 0) | (targets >= weight.shape[0])][0].item()
        raise ValueError(f"label {bad} is outside the vocabulary [0, {weight.shape[0]}) (and is not -100)")
    chunk = max(1, chunk_elements // weight.shape[0])
    loss_sum = _LinearCrossEntropySum.apply(h, weight, targets, chunk, upcast_matmul_dtype(h, weight))
    return loss_sum, n_tokens
