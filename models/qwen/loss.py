"""Output head + cross-entropy in chunks, never materialising full fp32 logits.

With Qwen's 151936-row vocabulary, the logits of a 2048-token sequence are 1.2 GB in fp32,
and autograd would keep them (plus the softmax) alive until backward. Here the head and the
loss are computed chunk by chunk over the supervised positions only, and the gradients with
respect to the hidden states (and the head weight, when it is trainable) are produced during
the forward pass, so peak memory is one chunk of logits.

    linear_cross_entropy(hidden, weight, labels) -> (loss summed over the batch, n_tokens)
    linear_log_probs(hidden, weight, labels)     -> (sum of log p(label) per row [B], n_tokens per row [B])

The second is what preference objectives (DPO, SimPO, ORPO) score a response with.
"""

from __future__ import annotations

from typing import Optional

import torch

from .cpu_fast_paths import CPU_SOFTMAX_ROWS, upcast_matmul_dtype

IGNORE_INDEX = -100

# Logit elements per chunk (fp32): 32M elements = 128 MB, about 220 tokens of Qwen's vocab.
CHUNK_ELEMENTS = 32 * 1024 * 1024


def _nll_and_logit_grad_(logits: torch.Tensor, targets: torch.Tensor, scratch: torch.Tensor, want_grad: bool,
                         offset: Optional[torch.Tensor] = None):
    """Per-row -log softmax(logits + offset)[target] in float64 [n]; in place, logits [n, V]
    become softmax - onehot rounded to their dtype when want_grad (the reference's fp32 math).

    scratch: fp32 [k, V] with k rows processed per step (k >= 1); offset: fp32 [V] or None.
    """
    n, k = logits.shape[0], scratch.shape[0]
    nll = torch.empty(n, dtype=torch.float64, device=logits.device)
    for s in range(0, n, k):
        x, t = logits[s : s + k], targets[s : s + k]
        m = x.shape[0]
        rows = torch.arange(m, device=t.device)
        p = scratch[:m]
        p.copy_(x)  # the reference's .float()
        if offset is not None:
            p.add_(offset)
        torch.ops.aten._softmax.out(p, -1, False, out=p)
        p_t = p[rows, t]
        out = nll[s : s + m]
        torch.log(p_t.double(), out=out).neg_()
        # Where p underflows (a target ~87 nats below the best logit) -log p would be inf:
        # those rows take the exact lse - logit from the logits, still untouched in x.
        tiny = p_t < torch.finfo(torch.float32).tiny
        if tiny.any():
            xt = x[tiny].float() + (offset if offset is not None else 0.0)
            out[tiny] = (torch.logsumexp(xt, -1) - xt.gather(1, t[tiny][:, None]).squeeze(1)).double()
        if want_grad:
            p[rows, t] = p_t - 1.0
            x.copy_(p)
    return nll


class _LinearCrossEntropySum(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i); hidden [N, H], weight [V, H], target [N].

    The function is the reference's: logits in the head's dtype (bf16), upcast to fp32, softmax
    and loss in fp32, and the gradient of the logits rounded back to the head's dtype. Every
    chunk reuses one preallocated logits buffer [chunk, V] and one fp32 scratch. Why: on CPU a
    fresh tensor of this size is a fresh mmap, and its first-touch page faults cost more than
    the softmax itself (benchmarks/RESULTS.md has the before/after).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, matmul_dtype, offset=None):
        need_h = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[1]
        loss = torch.zeros((), dtype=torch.float64, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for start, g, nll, w_mm in _head_chunks(hidden, weight, targets, chunk, matmul_dtype, offset,
                                                want_grad=need_h or need_w):
            loss += nll.sum()
            n = g.shape[0]  # g: softmax - onehot now, in the logits dtype
            if need_h:
                if matmul_dtype is not None:
                    grad_h[start : start + n] = g.to(matmul_dtype) @ w_mm
                else:
                    torch.mm(g, weight, out=grad_h[start : start + n])
            if need_w:
                grad_w.addmm_(g.t().float(), hidden[start : start + n].float())  # in place: no [V, H] temporary
        ctx.save_for_backward(*(x for x in (grad_h, grad_w) if x is not None))
        ctx.has = (need_h, need_w)
        ctx.w_dtype = weight.dtype
        ctx.h_dtype = hidden.dtype
        return loss.float()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        saved = list(ctx.saved_tensors)
        need_h, need_w = ctx.has
        grad_h = saved.pop(0) * grad_out.to(ctx.h_dtype) if need_h else None
        grad_w = (saved.pop(0) * grad_out.float()).to(ctx.w_dtype) if need_w else None
        return grad_h, grad_w, None, None, None, None


def _supervised(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor):
    """The supervised positions, shifted: (hidden [N, H], targets [N], keep [B, T-1] bool)."""
    targets = labels[:, 1:].reshape(-1)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    keep = targets != IGNORE_INDEX
    h, targets = h[keep], targets[keep]  # only supervised positions reach the head
    if (targets < 0).any() or (targets >= weight.shape[0]).any():
        bad = targets[(targets < 0) | (targets >= weight.shape[0])][0].item()
        raise ValueError(f"label {bad} is outside the vocabulary [0, {weight.shape[0]}) (and is not -100)")
    return h, targets, keep.view(labels.shape[0], -1)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_elements: int = CHUNK_ELEMENTS,
    logit_offset: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token loss and the number of supervised tokens.

    hidden [B, T, H] (final-norm output), weight [V, H] (the output head), labels [B, T]
    aligned with the inputs (shifted here: position t predicts labels[t + 1]); -100 = ignore.
    logit_offset [V] (optional): a constant added to each row's logit; log(m) makes a row
    stand for m ids that share it, -inf removes a row (data.vocab.subset uses both).
    Returns (loss_sum fp32 scalar, n_tokens int64 scalar).
    """
    h, targets, keep = _supervised(hidden, weight, labels)
    chunk = max(1, chunk_elements // weight.shape[0])
    if logit_offset is not None:
        logit_offset = logit_offset.to(device=h.device, dtype=torch.float32)
    loss_sum = _LinearCrossEntropySum.apply(h, weight, targets, chunk, upcast_matmul_dtype(h, weight), logit_offset)
    return loss_sum, keep.sum()


def _head_chunks(hidden, weight, targets, chunk: int, matmul_dtype, offset, want_grad: bool, logp_out=None):
    """Run the head over hidden [N, H] `chunk` rows at a time; yields (start, g, nll, w_mm) per chunk.

    g [n, V] (one reused buffer, in the head's dtype) holds softmax - onehot(target) when
    want_grad; nll [n] (float64) is each row's -log p(target), also written negated into
    logp_out [N] (float64, optional); w_mm is the weight as the matmuls use it.

    matmul_dtype=float32: bf16 operands multiplied by fp32 kernels, products rounded to bf16
    (same function as a bf16 GEMM; see linear.py). None: the operands' own dtype.
    """
    w_mm = weight.to(matmul_dtype) if matmul_dtype is not None else weight
    N, V = hidden.shape[0], weight.shape[0]
    chunk = min(chunk, max(N, 1))
    logits_buf = torch.empty(chunk, V, dtype=hidden.dtype, device=hidden.device)
    block = chunk if hidden.device.type != "cpu" or matmul_dtype is not None else min(chunk, CPU_SOFTMAX_ROWS)
    scratch = torch.empty(block, V, dtype=torch.float32, device=hidden.device)
    for start in range(0, N, chunk):
        h = hidden[start : start + chunk]
        n = h.shape[0]
        logits = logits_buf[:n]
        if matmul_dtype is not None:
            torch.mm(h.to(matmul_dtype), w_mm.t(), out=scratch[:n])
            logits.copy_(scratch[:n])  # round to the head's dtype, as a bf16 GEMM does
        else:
            torch.mm(h, weight.t(), out=logits)
        nll = _nll_and_logit_grad_(logits, targets[start : start + n], scratch, want_grad, offset)
        if logp_out is not None:
            torch.neg(nll, out=logp_out[start : start + n])
        yield start, logits, nll, w_mm


class _LinearLogProbsPerRow(torch.autograd.Function):
    """Per-row sums of log softmax(hidden_i @ weight.T)[target_i] -> fp32 [n_rows].

    hidden [N, H], weight [V, H], targets [N], rows [N] (the batch row of each position).
    Same arithmetic as _LinearCrossEntropySum, but the incoming gradient now differs per row,
    so the head weight's gradient cannot be formed during the forward pass. When only the
    hidden states need a gradient (adapters: the head is frozen), forward keeps d(-log p_i)/d
    hidden_i [N, H] (the size of the hidden states) and backward scales it by each row's
    gradient: no second pass over the head. When the head trains, backward recomputes each
    chunk's logits.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, rows, n_rows: int, chunk: int, matmul_dtype, offset=None):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        keep_grad_h = need_h and not need_w
        token_logp = torch.empty(hidden.shape[0], dtype=torch.float64, device=hidden.device)
        grad_h = torch.empty_like(hidden) if keep_grad_h else None
        for start, g, _, w_mm in _head_chunks(hidden, weight, targets, chunk, matmul_dtype, offset,
                                              want_grad=keep_grad_h, logp_out=token_logp):
            if keep_grad_h:
                out = grad_h[start : start + g.shape[0]]
                if matmul_dtype is not None:
                    out.copy_(g.to(matmul_dtype) @ w_mm)
                else:
                    torch.mm(g, weight, out=out)
        logps = torch.zeros(n_rows, dtype=torch.float64, device=hidden.device).index_add_(0, rows, token_logp)
        ctx.has = (need_h, need_w)
        ctx.setup = (chunk, matmul_dtype, offset)
        if need_w:
            ctx.save_for_backward(hidden, weight, targets, rows)
        elif keep_grad_h:
            ctx.save_for_backward(grad_h, rows)
        return logps.float()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        need_h, need_w = ctx.has
        # d log p_i / d logits = onehot - softmax = -g: each position gets -(its row's gradient).
        if not need_w:
            grad_nll, rows = ctx.saved_tensors
            scale = (-grad_out.float())[rows]
            return (grad_nll * scale[:, None].to(grad_nll.dtype),) + (None,) * 7
        hidden, weight, targets, rows = ctx.saved_tensors
        chunk, matmul_dtype, offset = ctx.setup
        scale = (-grad_out.float())[rows]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start, g, _, w_mm in _head_chunks(hidden, weight, targets, chunk, matmul_dtype, offset, want_grad=True):
            n = g.shape[0]
            g.copy_(g.float() * scale[start : start + n, None])
            if need_h:
                grad_h[start : start + n] = g.to(matmul_dtype) @ w_mm if matmul_dtype is not None else g @ weight
            grad_w.addmm_(g.t().float(), hidden[start : start + n].float())
        return grad_h, grad_w.to(weight.dtype), None, None, None, None, None, None


def linear_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_elements: int = CHUNK_ELEMENTS,
    logit_offset: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sum of log p(label) over the supervised positions, and their count per row.

    Inputs as linear_cross_entropy (labels shifted here, -100 ignored). Returns
    (logps fp32 [B], n_tokens int64 [B]); a row without supervised tokens has logp 0.
    Differentiable in hidden and weight; never holds more than one chunk of logits.
    """
    h, targets, keep = _supervised(hidden, weight, labels)
    B = labels.shape[0]
    rows = torch.arange(B, device=labels.device)[:, None].expand_as(keep)[keep]
    chunk = max(1, chunk_elements // weight.shape[0])
    if logit_offset is not None:
        logit_offset = logit_offset.to(device=h.device, dtype=torch.float32)
    logps = _LinearLogProbsPerRow.apply(h, weight, targets, rows, B, chunk, upcast_matmul_dtype(h, weight), logit_offset)
    return logps, keep.sum(1)
