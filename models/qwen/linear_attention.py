"""Gated DeltaNet, the linear-attention token mixer of Qwen3.5, in plain PyTorch (no fla, no
causal-conv1d: it runs on any device).

Per value head h the layer keeps a state S [key_head_dim, value_head_dim] and, token by token,

    S_t = a_t S_{t-1} + beta_t k_t (v_t - a_t S_{t-1}^T k_t)^T        (the gated delta rule)
    o_t = S_t^T q_t

with a_t = exp(g_t), g_t = -exp(A_log) * softplus(a_proj_t + dt_bias), beta_t = sigmoid(b_t),
q and k L2-normalised and q scaled by key_head_dim^-0.5. q, k, v come out of one projection
(in_proj_qkv) through a depthwise causal conv + SiLU; q/k heads are shared by groups of value
heads. The output is RMS-normalised per head, gated by silu(z) (z = in_proj_z(x)), and projected
back by out_proj. transformers' torch fallback (Qwen3_5GatedDeltaNet) is the reference.

Two evaluations of the same recurrence:
* `chunk_gated_delta_rule` (training, prefill): 64-token chunks; inside a chunk the updates are
  solved at once (a unit lower-triangular system), between chunks the state is carried.
* `recurrent_gated_delta_rule` (decoding with a cache): one token at a time.

Packed documents (`document_ids`): the state is reset at every document start and the conv sees
no token of an earlier document, so every document is computed exactly as if it were alone (what
fla's kernels do with cu_seqlens; transformers' torch fallback ignores document boundaries).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import QwenConfig
from .linear import Linear

CHUNK_SIZE = 64


class GatedRMSNorm(nn.Module):
    """RMSNorm over the last dim times silu(gate): x, gate [..., dim] -> [..., dim] in x's dtype.

    As transformers' Qwen3_5RMSNormGated: a plain weight (initialised to 1) multiplies the
    normalised x cast back to x's dtype; the gate is applied in float32.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        h = self.weight * h.to(dtype)
        return (h * F.silu(gate.float())).to(dtype)


def l2_normalise(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(|x|^2 + eps) over the last dim (fla's and transformers' form)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


# ---------------------------------------------------------------------- causal conv
def causal_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    state: Optional[torch.Tensor] = None,
    document_ids: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv + SiLU. x [B, C, T], weight [C, 1, K] -> (y [B, C, T] in x's dtype,
    new state [B, C, K-1]: the last K-1 inputs, zeros where the sequence is shorter).

    state: the previous call's last K-1 inputs (decoding), else zeros (a sequence start).
    document_ids [B, T]: a tap that would reach into another document reads zero instead.
    """
    C, T, K = x.shape[1], x.shape[-1], weight.shape[-1]
    if state is not None:
        padded = torch.cat([state.to(x.dtype), x], dim=-1)
    else:
        padded = F.pad(x, (K - 1, 0))
    new_state = padded[..., padded.shape[-1] - (K - 1) :]
    padded = padded.to(weight.dtype)
    if document_ids is None:
        y = F.conv1d(padded, weight, groups=C)
    else:
        # Tap s multiplies the input K-1-s positions back; drop it where that input belongs to
        # another document (or lies before the sequence: id -1).
        docs = F.pad(document_ids, (K - 1, 0), value=-1)
        y = torch.zeros_like(padded[..., :T])
        for s in range(K):
            same = (docs[:, s : s + T] == document_ids)[:, None, :]
            y = y + padded[..., s : s + T] * weight[:, :, s] * same
    return F.silu(y).to(x.dtype), new_state


# ---------------------------------------------------------------------- the delta rule
def recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule one token at a time (decoding).

    q, k [B, H, T, Dk] L2-normalised (q not yet scaled); v [B, H, T, Dv]; g (log decay, <= 0)
    and beta [B, H, T]; all float32. initial_state [B, H, Dk, Dv] or None (zeros).
    Returns (o [B, H, T, Dv], final state [B, H, Dk, Dv]).
    """
    B, H, T, Dk = k.shape
    q = q / math.sqrt(Dk)
    state = q.new_zeros(B, H, Dk, v.shape[-1]) if initial_state is None else initial_state.to(q)
    outs = []
    for t in range(T):
        state = state * g[:, :, t].exp()[..., None, None]
        k_t = k[:, :, t, :, None]  # [B, H, Dk, 1]
        predicted = (state * k_t).sum(dim=-2)  # S^T k: what the state recalls for k_t, [B, H, Dv]
        delta = (v[:, :, t] - predicted) * beta[:, :, t, None]
        state = state + k_t * delta[:, :, None, :]
        outs.append((state * q[:, :, t, :, None]).sum(dim=-2))
    return torch.stack(outs, dim=2), state


def _document_masks(document_ids: torch.Tensor, n_chunks: int, chunk: int):
    """Masks that cut the chunked recurrence at document starts. document_ids [B, T_padded].

    Returns, broadcastable over heads:
      same_doc [B, 1, N, C, C]: positions i, j of a chunk are in one document (no reset between);
      from_start [B, 1, N, C]: no reset from the chunk's start through i (i may read the carried state);
      to_end [B, 1, N, C]: no reset after j in its chunk (j writes into the carried state);
      whole [B, 1, N]: no reset in the chunk (the carried state survives it).
    """
    docs = document_ids.reshape(document_ids.shape[0], 1, n_chunks, chunk)
    before = torch.cat([docs[:, :, :1, :1], docs[:, :, :-1, -1:]], dim=2)  # the token before each chunk
    same_doc = docs[..., :, None] == docs[..., None, :]
    from_start = docs == before
    to_end = docs == docs[..., -1:]
    whole = docs[..., -1] == before[..., 0]
    return same_doc, from_start, to_end, whole


class _UnitLowerInverse(torch.autograd.Function):
    """T = (I + strict_lower(A))^-1 for A [..., C, C] (A's diagonal and upper part are ignored).

    Forward: one triangular solve against the identity. Backward: the derivative of a matrix
    inverse, dA = -(T^T dT T^T) restricted to the strict lower triangle: two batched matmuls, where
    autograd through `solve_triangular` would solve again (slow on CPU for these 64 x 64 batches).
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a)
        inverse = torch.linalg.solve_triangular(a, eye, upper=False, unitriangular=True)
        ctx.save_for_backward(inverse)
        return inverse

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (inverse,) = ctx.saved_tensors
        t = inverse.mT
        return -(t @ grad @ t).tril(-1)


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    document_ids: Optional[torch.Tensor] = None,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule over chunks of `chunk_size` tokens (training and prefill).

    Same inputs and outputs as `recurrent_gated_delta_rule`; document_ids [B, T] resets the
    state at each document start. Within chunk n, with G_i the cumulative log decay from the
    chunk start through i (the formulation of transformers' torch_chunk_gated_delta_rule and of
    fla's kernels):

      L_ij = exp(G_i - G_j) for j <= i (0 above the diagonal)
      T = (I + strict_lower((beta k) k^T * L))^-1,   u = T (beta v),   w = T (beta k exp(G))
      v_new = u - w S_n,   o = (q exp(G)) S_n + ((q k^T) * L) v_new,
      S_n+1 = exp(G_last) S_n + (k exp(G_last - G))^T v_new.

    Only v_new and the states need the sequential scan over chunks; every other product runs
    batched over all chunks. transformers solves for u and w directly instead of forming T, so
    the two agree to float rounding (~1e-7 relative), not bit for bit.
    """
    B, H, T, Dk = k.shape
    Dv = v.shape[-1]
    C = chunk_size
    q = q * Dk**-0.5
    pad = (-T) % C
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
        if document_ids is not None:  # padding continues the last document: no reset
            document_ids = torch.cat([document_ids, document_ids[:, -1:].expand(-1, pad)], dim=1)
    N = (T + pad) // C
    v_beta = v * beta[..., None]
    k_beta = k * beta[..., None]
    q, k, k_beta, v_beta = (x.reshape(B, H, N, C, x.shape[-1]) for x in (q, k, k_beta, v_beta))
    G = g.reshape(B, H, N, C).cumsum(dim=-1)

    upper = torch.ones(C, C, dtype=torch.bool, device=q.device).triu(1)
    L = (G[..., :, None] - G[..., None, :]).masked_fill(upper, float("-inf")).exp()
    decay_from_start = G.exp()  # state at the chunk start -> position i
    decay_to_end = (G[..., -1:] - G).exp()  # position j -> the chunk end
    decay_chunk = G[..., -1].exp()
    if document_ids is not None:
        same_doc, from_start, to_end, whole = _document_masks(document_ids, N, C)
        L = L * same_doc
        decay_from_start = decay_from_start * from_start
        decay_to_end = decay_to_end * to_end
        decay_chunk = decay_chunk * whole

    inverse = _UnitLowerInverse.apply((k_beta @ k.transpose(-1, -2)) * L)
    u = inverse @ v_beta
    w = inverse @ (k_beta * decay_from_start[..., None])
    k_to_state = (k * decay_to_end[..., None]).transpose(-1, -2)  # [B, H, N, Dk, C]

    # The scan over chunks. unbind, not indexing: its backward stacks the N gradients once,
    # where N index backwards would each fill a zero tensor of the whole size.
    state = q.new_zeros(B, H, Dk, Dv) if initial_state is None else initial_state.to(q)
    states, v_news = [], []
    for u_n, w_n, k_n, decay_n in zip(u.unbind(2), w.unbind(2), k_to_state.unbind(2), decay_chunk.unbind(2)):
        v_new = u_n - w_n @ state
        states.append(state)
        v_news.append(v_new)
        state = state * decay_n[..., None, None] + k_n @ v_new
    states_all = torch.stack(states, dim=2)  # [B, H, N, Dk, Dv]: the state each chunk reads
    v_new_all = torch.stack(v_news, dim=2)  # [B, H, N, C, Dv]
    out = (q * decay_from_start[..., None]) @ states_all + ((q @ k.transpose(-1, -2)) * L) @ v_new_all
    return out.reshape(B, H, N * C, Dv)[:, :, :T], state


# ---------------------------------------------------------------------- the layer
class GatedDeltaNet(nn.Module):
    """Qwen3.5 linear attention. x [B, T, hidden] -> [B, T, hidden].

    Parameters (checkpoint names): in_proj_qkv [2*key_dim + value_dim, hidden], in_proj_z
    [value_dim, hidden], in_proj_b / in_proj_a [v_heads, hidden], conv1d.weight [conv_dim, 1, K],
    dt_bias / A_log [v_heads], norm.weight [value_head_dim], out_proj [hidden, value_dim].
    """

    def __init__(self, config: QwenConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_k_heads = config.linear_num_key_heads
        self.num_v_heads = config.linear_num_value_heads
        self.head_k_dim = config.linear_key_head_dim
        self.head_v_dim = config.linear_value_head_dim
        self.key_dim = config.linear_key_dim
        self.value_dim = config.linear_value_dim
        conv_dim = config.linear_conv_dim
        self.build_projections(config)
        k = config.linear_conv_kernel_dim
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, k, groups=conv_dim, bias=False, padding=k - 1)
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_v_heads))
        self.norm = GatedRMSNorm(self.head_v_dim, config.rms_norm_eps)
        self.out_proj = Linear(self.value_dim, config.hidden_size, bias=False)

    def build_projections(self, config: QwenConfig) -> None:
        """The input projections: Qwen3.5's four (a family with another layout overrides this and
        `project`)."""
        hidden = config.hidden_size
        self.in_proj_qkv = Linear(hidden, config.linear_conv_dim, bias=False)
        self.in_proj_z = Linear(hidden, self.value_dim, bias=False)
        self.in_proj_b = Linear(hidden, self.num_v_heads, bias=False)
        self.in_proj_a = Linear(hidden, self.num_v_heads, bias=False)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, hidden] -> (qkv [B, T, conv_dim] as [q | k | v], z [B, T, v_heads, v_dim],
        b [B, T, v_heads], a [B, T, v_heads]), each head in head order."""
        B, T, _ = x.shape
        z = self.in_proj_z(x).view(B, T, self.num_v_heads, self.head_v_dim)
        return self.in_proj_qkv(x), z, self.in_proj_b(x), self.in_proj_a(x)

    @torch.no_grad()
    def init_decay(self) -> None:
        """HF's initialisation of the decay: dt_bias = 1, A = exp(A_log) ~ U(0.01, 16)."""
        self.dt_bias.fill_(1.0)
        self.A_log.copy_(torch.empty_like(self.A_log, dtype=torch.float32).uniform_(0.01, 16).log())

    def forward(
        self,
        x: torch.Tensor,
        cache=None,
        *,
        document_ids: Optional[torch.Tensor] = None,
        padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """x [B, T, hidden]; cache: a KVCache (its conv and recurrent state for this layer are
        read and replaced); document_ids [B, T] (training only); padding_mask [B, T], 0 on
        padding tokens, whose inputs are zeroed so they leave no trace in the state."""
        B, T, _ = x.shape
        if padding_mask is not None:
            x = (x * padding_mask[:, :, None]).to(x.dtype)
        conv_state = recurrent_state = None
        if cache is not None:
            if document_ids is not None:
                raise ValueError("document_ids are a training-time input; they cannot be combined with a cache")
            conv_state, recurrent_state = cache.linear_state(self.layer_idx)
        qkv, z, b, a = self.project(x)
        mixed, new_conv_state = causal_conv(
            qkv.transpose(1, 2), self.conv1d.weight, state=conv_state, document_ids=document_ids
        )
        q, k, v = mixed.transpose(1, 2).split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        beta = b.sigmoid()
        # In float32: A_log.exp() of a 16-bit parameter can overflow to inf.
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)

        with torch.autocast(x.device.type, enabled=False):  # the recurrence runs in float32
            q, k = (self._per_value_head(t.reshape(B, T, self.num_k_heads, self.head_k_dim)) for t in (q, k))
            q, k = l2_normalise(q), l2_normalise(k)
            v = v.reshape(B, T, self.num_v_heads, self.head_v_dim).transpose(1, 2).float()
            beta, g = beta.transpose(1, 2).float(), g.transpose(1, 2)
            if cache is not None and T == 1 and cache.length > 0:
                out, state = recurrent_gated_delta_rule(q, k, v, g, beta, recurrent_state)
            else:
                out, state = chunk_gated_delta_rule(
                    q, k, v, g, beta, initial_state=recurrent_state, document_ids=document_ids
                )
        if cache is not None:
            cache.set_linear_state(self.layer_idx, new_conv_state, state)
        out = self.norm(out.transpose(1, 2).to(x.dtype), z)  # [B, T, v_heads, v_dim]
        return self.out_proj(out.reshape(B, T, self.value_dim))

    def _per_value_head(self, t: torch.Tensor) -> torch.Tensor:
        """[B, T, k_heads, D] -> [B, v_heads, T, D] float32: each q/k head serves
        v_heads // k_heads consecutive value heads."""
        t = t.transpose(1, 2).float()
        groups = self.num_v_heads // self.num_k_heads
        return t.repeat_interleave(groups, dim=1) if groups > 1 else t
