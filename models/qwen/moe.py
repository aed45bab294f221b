"""Qwen3-MoE's sparse MLP: a softmax router over E SwiGLU experts, top-k experts per token; and
Qwen3.5-MoE's, the same plus a shared expert scaled by a sigmoid gate.

    block = SparseMoeBlock(config)     # .gate: TopKRouter, weight [E, hidden]; .experts.{e}: SwiGLU
    y = block(x)                       # x [B, T, hidden] -> [B, T, hidden]
    block = SharedExpertMoeBlock(config)   # + .shared_expert: SwiGLU, .shared_expert_gate [1, hidden]

    with collect_router_logits() as logits:      # each block's router logits [B*T, E], layer order
        loss = model(ids, labels=labels)
    aux = load_balancing_loss(logits, num_experts, top_k, attention_mask)

Module names are the published checkpoints' (`mlp.gate.weight`, `mlp.experts.{e}.gate_proj.weight`,
...), so every expert projection is an ordinary linear: LoRA wraps it, NF4 quantises it, the
checkpoint loader streams it, exactly as for a dense MLP. The router is not a linear layer (as in
transformers): it is never quantised and never an "all-linear" LoRA target.

The experts run grouped: the (token, slot) pairs are sorted by expert and each expert runs once,
on the contiguous rows routed to it (one GEMM per projection per expert; never a loop over
tokens). SharedExpertMoeBlock (Qwen3.5-MoE) reuses the routing and dispatch as they are.

`expert_kernel` lets the package that wraps the expert linears (an adapter package) run all
experts of the block at once on the grouped rows, as grouped GEMMs (`grouped_mm`): a function
(block, rows [M, hidden], counts) -> [M, hidden], or None when it does not apply (then the
per-expert loop runs).
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError
from .layers import SwiGLU
from .linear import Linear, bf16_linear

if TYPE_CHECKING:
    from pathlib import Path

    from .config import QwenConfig

# The list the running forward appends router logits to (None: nobody asked for them). A context
# variable, not a module attribute, so that the recomputation of a gradient-checkpointed block
# during backward (outside the `with`) does not append a second copy.
_ROUTER_LOGITS: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar("router_logits", default=None)


@contextlib.contextmanager
def collect_router_logits() -> Iterator[list]:
    """Within the block, every SparseMoeBlock forward appends its router logits [N, E] to the list."""
    sink: list[torch.Tensor] = []
    token = _ROUTER_LOGITS.set(sink)
    try:
        yield sink
    finally:
        _ROUTER_LOGITS.reset(token)


class TopKRouter(nn.Module):
    """Softmax router (Qwen3MoeTopKRouter). h [N, hidden] -> (logits [N, E] in h's dtype,
    weights [N, k] in h's dtype, experts [N, k] int64).

    The softmax runs in float32 over all E experts; the top-k probabilities are renormalised to
    sum to 1 only when `norm_topk_prob` (Qwen3-30B-A3B: yes; transformers' default: no).
    """

    def __init__(self, hidden: int, num_experts: int, top_k: int, norm_topk_prob: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden))
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob

    def forward(self, h: torch.Tensor):
        logits = bf16_linear(h, self.weight)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(logits.dtype), experts

    def extra_repr(self) -> str:
        E, H = self.weight.shape
        return f"experts={E}, hidden={H}, top_k={self.top_k}, norm_topk_prob={self.norm_topk_prob}"


class SparseMoeBlock(nn.Module):
    """Router + experts (Qwen3MoeSparseMoeBlock; no shared expert). x [..., hidden] -> same shape.

    Each token's output is sum over its k experts of weight_j * expert_j(x).
    """

    # (block, rows grouped by expert [M, hidden], counts: rows per expert) -> [M, hidden], or None
    # (not applicable: the per-expert loop runs). Set per block by whoever wraps the experts' linears.
    expert_kernel: Optional[Callable[["SparseMoeBlock", torch.Tensor, list], Optional[torch.Tensor]]] = None

    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.gate = TopKRouter(config.hidden_size, config.num_experts, config.num_experts_per_tok,
                               config.norm_topk_prob)
        self.experts = nn.ModuleList(
            SwiGLU(config.hidden_size, config.moe_intermediate_size) for _ in range(config.num_experts)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return self.routed(x.reshape(-1, shape[-1])).view(shape)

    def routed(self, h: torch.Tensor) -> torch.Tensor:
        """h [N, hidden] -> the routed experts' weighted sum [N, hidden] (router logits to the sink)."""
        logits, weights, experts = self.gate(h)
        sink = _ROUTER_LOGITS.get()
        if sink is not None:
            sink.append(logits)
        return self.run_experts(h, weights, experts)

    def run_experts(self, h: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """h [N, hidden], weights [N, k], experts [N, k] -> sum_j weights[:, j] * expert_j(h), [N, hidden]."""
        N, k = experts.shape
        slot_expert = experts.reshape(-1)  # [N*k]: the expert of each (token, slot) pair
        order = torch.argsort(slot_expert, stable=True)  # the pairs grouped by expert
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        counts = torch.bincount(slot_expert, minlength=self.num_experts).tolist()  # the layer's one host sync
        grouped = _GroupRows.apply(h, order, inverse, k)  # [N*k, hidden], expert 0's rows first
        kernel = self.expert_kernel
        out = kernel(self, grouped, counts) if kernel is not None and N else None
        if out is not None:
            y = _UngroupRows.apply(out, inverse, order).view(N, k, -1)
            return _WeightedSlotSum.apply(y, weights)
        # An expert no token reached still runs, on zero rows, when it holds trainable weights: its
        # gradient is then an honest zero instead of None (the trainer checks that every trainable
        # parameter got one; DDP needs every one used). Inference skips it.
        run_empty = torch.is_grad_enabled() and any(p.requires_grad for p in self.experts.parameters())
        outputs = [
            expert(rows)
            for expert, rows, n in zip(self.experts, grouped.split(counts), counts)
            if n or run_empty
        ]
        if not outputs:  # no token at all
            return torch.zeros_like(h)
        y = _UngroupRows.apply(torch.cat(outputs), inverse, order).view(N, k, -1)  # (token, slot) order
        return _WeightedSlotSum.apply(y, weights)


class SharedExpertGate(Linear):
    """`shared_expert_gate`: Linear hidden -> 1, no bias; sigmoid of it scales the shared expert per token.

    A linear layer like any other for the checkpoint and for an adapter that names it (PEFT's
    "all-linear" does), but like the router a routing decision of one row: a 4-bit load keeps it
    16-bit and this library's "all-linear" leaves it out (a rank-r adapter on a [1, hidden] weight
    has more parameters than the weight).
    """

    def __init__(self, hidden: int):
        super().__init__(hidden, 1, bias=False)


class SharedExpertMoeBlock(SparseMoeBlock):
    """Router + experts + gated shared expert (Qwen3_5MoeSparseMoeBlock). x [..., hidden] -> same shape.

        y = sum over the token's k experts of weight_j * expert_j(x) + sigmoid(gate(x)) * shared_expert(x)

    The router always renormalises its top-k weights (config.norm_topk_prob is True for this family).
    """

    def __init__(self, config):
        super().__init__(config)
        self.shared_expert = SwiGLU(config.hidden_size, config.shared_expert_intermediate_size)
        self.shared_expert_gate = SharedExpertGate(config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        shared = torch.sigmoid(self.shared_expert_gate(h)) * self.shared_expert(h)
        return (self.routed(h) + shared).view(shape)


def _sum_slots(y: torch.Tensor) -> torch.Tensor:
    """y [N, k, hidden] -> [N, hidden]: y.sum(dim=1) to the bit (fp32 accumulation in slot order,
    one rounding), written as k - 1 additions: on CPU a bf16 reduction over the middle dim is
    ~2.5x slower."""
    acc = y[:, 0].float()
    for j in range(1, y.shape[1]):
        acc += y[:, j]
    return acc.to(y.dtype)


class _WeightedSlotSum(torch.autograd.Function):
    """out = (y * w[..., None]).sum(dim=1): y [N, k, hidden], w [N, k] -> [N, hidden].

    Each product rounded to y's dtype, then summed in fp32 in slot order, as transformers
    combines the experts (no atomics: deterministic on CUDA). One function so that neither pass
    materialises autograd's zero-filled [N, k, hidden] slice gradients.
    """

    @staticmethod
    def forward(ctx, y, w):
        ctx.save_for_backward(y, w)
        acc = (y[:, 0] * w[:, 0:1]).float()
        for j in range(1, y.shape[1]):
            acc += y[:, j] * w[:, j : j + 1]
        return acc.to(y.dtype)

    @staticmethod
    def backward(ctx, grad):
        y, w = ctx.saved_tensors
        g = grad.unsqueeze(1)
        return g * w.unsqueeze(-1), (g * y).sum(dim=-1)


class _GroupRows(torch.autograd.Function):
    """rows = h[order // k] [N*k, hidden]: each token's row once per slot, grouped by expert.

    Backward gathers the slot gradients back into (token, slot) order and sums each token's k:
    a gather and a reshape-sum, where index_select's own backward scatters with index_add.
    """

    @staticmethod
    def forward(ctx, h, order, inverse, k: int):
        ctx.save_for_backward(inverse)
        ctx.k = k
        return h.index_select(0, torch.div(order, k, rounding_mode="floor"))

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return _sum_slots(grad.index_select(0, inverse).view(-1, ctx.k, grad.shape[-1])), None, None, None


class _UngroupRows(torch.autograd.Function):
    """y[inverse]: rows grouped by expert back to (token, slot) order (inverse = the permutation
    undoing `order`); backward is the gather by `order`, not a scatter."""

    @staticmethod
    def forward(ctx, y, inverse, order):
        ctx.save_for_backward(order)
        return y.index_select(0, inverse)

    @staticmethod
    def backward(ctx, grad):
        (order,) = ctx.saved_tensors
        return grad.index_select(0, order), None, None


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [M, in] (rows grouped by expert), weight [E, out, in], offsets int32 [E] (cumulative row
    counts, last = M) -> [M, out]: rows offsets[e-1]:offsets[e] times weight[e]ᵀ, all experts in one
    op each way (forward, grad of x, grad of weight). Each group is the product F.linear gives it
    (bf16: accumulated in fp32, rounded once; through fp32 kernels where bf16_linear would be); an
    expert with no rows gets an exactly zero weight gradient. Saves x only when weight needs a
    gradient and weight only when x does (a frozen base keeps its stacked weight, not its input).
    """
    return _GroupedMM.apply(x, weight, offsets)


def group_offsets(counts: Sequence[int], device) -> torch.Tensor:
    """Rows per expert -> the int32 end offsets grouped_mm takes."""
    return torch.tensor(list(counts), dtype=torch.int64).cumsum(0).to(device=device, dtype=torch.int32)


def _aligned(*tensors: torch.Tensor) -> bool:
    """torch._grouped_mm's kernel wants 16-byte aligned data and strides (but the unit one)."""
    return all(t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0 for s in t.stride() if s != 1)
               for t in tensors)


def grouped_product(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """No autograd: a [M, K] @ b[e] for b [E, K, N] (groups of rows of a), or a [K, M] @ b [M, N]
    summed per group of M (-> [E, K, N], a weight gradient); torch._grouped_mm where its stride
    rule holds, else a padded bmm. For custom backward passes (grouped_mm, an adapter's grouped update)."""
    if _aligned(a, b):
        try:
            return torch._grouped_mm(a, b, offs=offsets)
        except RuntimeError:  # a layout this build's kernel refuses: the padded form below
            pass
    return _padded_mm(a, b, offsets)


def _padded_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """grouped_product as one bmm over segments zero-padded to the largest group."""
    E = offsets.numel()
    ends = offsets.long()
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    counts = ends - starts
    cap = max(int(counts.max()), 1)
    M = int(ends[-1])
    seg = torch.repeat_interleave(torch.arange(E, device=a.device), counts)
    slot = seg * cap + (torch.arange(M, device=a.device) - starts[seg])  # row -> its padded place
    if b.dim() == 3:  # a [M, K], b [E, K, N] -> [M, N]
        padded = a.new_zeros(E * cap, a.shape[1]).index_copy_(0, slot, a[:M]).view(E, cap, -1)
        return torch.bmm(padded, b).view(E * cap, -1).index_select(0, slot)
    # a [K, M], b [M, N] -> [E, K, N]
    pa = a.new_zeros(E * cap, a.shape[0]).index_copy_(0, slot, a.t()[:M]).view(E, cap, -1)
    pb = b.new_zeros(E * cap, b.shape[1]).index_copy_(0, slot, b[:M]).view(E, cap, -1)
    return torch.bmm(pa.transpose(1, 2), pb)


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, offsets):
        from .cpu_fast_paths import upcast_matmul_dtype

        compute = upcast_matmul_dtype(x, weight) or x.dtype
        ctx.compute, ctx.x_dtype, ctx.w_dtype = compute, x.dtype, weight.dtype
        need_x, need_w = ctx.needs_input_grad[:2]
        ctx.save_for_backward(x if need_w else None, weight if need_x else None, offsets)
        out = grouped_product(x.to(compute), weight.to(compute).transpose(-2, -1), offsets)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, offsets = ctx.saved_tensors
        g = grad.contiguous().to(ctx.compute)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = grouped_product(g, weight.to(ctx.compute), offsets).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = grouped_product(g.t(), x.to(ctx.compute), offsets).to(ctx.w_dtype)
        return grad_x, grad_w, None


def moe_blocks(model: nn.Module) -> list[SparseMoeBlock]:
    """Every SparseMoeBlock (SharedExpertMoeBlock included) of `model`, in model order."""
    return [m for m in model.modules() if isinstance(m, SparseMoeBlock)]


def load_balancing_loss(
    router_logits: Sequence[torch.Tensor],
    num_experts: int,
    top_k: int,
    attention_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The Switch-Transformer auxiliary loss, exactly transformers' `load_balancing_loss_func`.

    router_logits: per sparse layer [N, E] (N = B*T); attention_mask [B, T] (1 = real token) or
    None. With f_e the fraction of top-k slots and P_e the mean router probability of expert e,
    both pooled over the layers and the real tokens: E * sum_e f_e * P_e (1 when balanced).
    Returns a float32 scalar.
    """
    if not router_logits:
        raise ValueError("load_balancing_loss: no router logits (the model has no sparse layer)")
    device = router_logits[0].device
    tokens_per_expert = torch.zeros(num_experts, dtype=torch.float32, device=device)
    prob_per_expert = torch.zeros(num_experts, dtype=torch.float32, device=device)
    rows = torch.zeros((), dtype=torch.float32, device=device)
    mask = None
    if attention_mask is not None:
        mask = attention_mask.reshape(-1).to(device=device, dtype=torch.float32)
    for logits in router_logits:
        # transformers takes this softmax in the logits' dtype (bf16 in a bf16 model), then sums in fp32
        probs = F.softmax(logits, dim=-1)
        _, chosen = torch.topk(probs, top_k, dim=-1)
        row_weight = mask if mask is not None else torch.ones(probs.shape[0], device=device)
        tokens_per_expert = tokens_per_expert.index_add(0, chosen.reshape(-1), row_weight.repeat_interleave(top_k))
        prob_per_expert = prob_per_expert + (probs.float() * row_weight.unsqueeze(-1)).sum(dim=0)
        rows = rows + row_weight.sum()
    return (tokens_per_expert / rows * prob_per_expert / rows).sum() * num_experts


# ---------------------------------------------------------------------- fused experts on disk
# transformers (v5) holds a sparse layer's experts as two 3-D tensors; a checkpoint written from
# that state dict as it is (rather than by save_pretrained, which splits them again) stores
#   mlp.experts.gate_up_proj [E, 2 * moe_intermediate, hidden]  (gate rows, then up rows)
#   mlp.experts.down_proj    [E, hidden, moe_intermediate]
# The published Qwen3-MoE checkpoints (and our save, and save_pretrained for both families) store
# one tensor per expert and projection; the published Qwen3.5-MoE ones store the fused pair.
_FUSED_EXPERTS = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def map_fused_experts(key: str, tensor: torch.Tensor, cfg: "QwenConfig", file: "Path") -> list[tuple[str, torch.Tensor]]:
    """A fused expert tensor -> [(per-expert key, tensor)]; any other tensor passes unchanged."""
    m = _FUSED_EXPERTS.match(key)
    if not m:
        return [(key, tensor)]
    prefix, kind = m.groups()
    E, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    want = (E, 2 * I, H) if kind == "gate_up_proj" else (E, H, I)
    if tuple(tensor.shape) != want:
        raise CheckpointError(f"{file}: tensor {key!r} has shape {tuple(tensor.shape)}, expected {want}")
    out = []
    for e in range(E):
        # clone: each expert its own storage (safetensors refuses to save tensors sharing one)
        if kind == "gate_up_proj":
            out.append((f"{prefix}.{e}.gate_proj.weight", tensor[e, :I].clone()))
            out.append((f"{prefix}.{e}.up_proj.weight", tensor[e, I:].clone()))
        else:
            out.append((f"{prefix}.{e}.down_proj.weight", tensor[e].clone()))
    return out
