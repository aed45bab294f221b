"""The Qwen decoder, written from scratch; module names are the HF Qwen2 checkpoint names.

    Qwen
    ├── model: QwenBackbone
    │   ├── embed_tokens: Embedding [vocab, hidden]
    │   ├── layers.{i}: DecoderLayer
    │   │   ├── input_layernorm: RMSNorm
    │   │   ├── self_attn: Attention (q_proj, k_proj, v_proj, o_proj[, q_norm, k_norm])
    │   │   ├── post_attention_layernorm: RMSNorm
    │   │   └── mlp: SwiGLU (gate_proj, up_proj, down_proj), or in a Qwen3-MoE sparse layer
    │   │            SparseMoeBlock (gate: router [E, hidden]; experts.{e}: SwiGLU)
    │   └── norm: RMSNorm
    └── lm_head: Linear [vocab, hidden] (the same Parameter as embed_tokens when tied)

So `model.state_dict()` keys are checkpoint keys: no conversion tables.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import Attention, KVCache, build_attention_mask
from .config import QwenConfig
from .layers import RMSNorm, SwiGLU
from .linear import Linear
from .loss import IGNORE_INDEX, linear_cross_entropy
from .moe import SparseMoeBlock, TopKRouter, collect_router_logits, load_balancing_loss
from .rope import RotaryEmbedding


def make_mlp(config: QwenConfig, layer_idx: int) -> nn.Module:
    """The MLP of decoder layer `layer_idx`: x [B, T, hidden] -> [B, T, hidden].

    A Qwen3-MoE sparse layer gets the router + experts block, every other layer the dense
    SwiGLU of `intermediate_size`. Other block types plug in here.
    """
    if config.is_sparse_layer(layer_idx):
        return SparseMoeBlock(config)
    return SwiGLU(config.hidden_size, config.intermediate_size)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then h + mlp(norm(h)). [B, T, hidden] -> same."""

    def __init__(self, config: QwenConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = make_mlp(config, layer_idx)

    def forward(self, x, cos, sin, mask=None, cache: Optional[KVCache] = None):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class QwenBackbone(nn.Module):
    """Embeddings, decoder blocks and final norm: ids [B, T] -> hidden [B, T, hidden]."""

    def __init__(self, config: QwenConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """Per-document positions: [B, T] document ids -> [B, T] positions restarting at 0."""
    B, T = document_ids.shape
    idx = torch.arange(T, device=document_ids.device).expand(B, T)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_idx


class Qwen(nn.Module):
    """Qwen2 / Qwen2.5 / Qwen3 / Qwen3-MoE causal LM.

    forward(input_ids [B, T]) -> logits [B, T, vocab]
    forward(input_ids, labels=[B, T]) -> mean loss over labels != -100 (shifted inside)
    forward(..., reduction="sum") -> (loss_sum, n_supervised_tokens), for accumulation

    Qwen3-MoE with `config.output_router_logits`, in training mode: the loss also holds
    router_aux_loss_coef x the load-balancing loss of the batch, as transformers' loss does (in
    eval mode the loss is the cross-entropy alone: perplexity). With reduction="sum" that term
    is weighted by the batch's supervised tokens (loss_sum + coef * aux * n), so the trainer's
    sum over micro-batches / N (supervised tokens of the optimizer step) is the token-mean
    cross-entropy plus coef x the token-weighted mean of the micro-batches' aux losses: one
    micro-batch gives exactly transformers' loss, and no split of the step changes the weight a
    token's micro-batch gets. (The aux loss itself is a per-batch statistic: it depends on how
    the step is cut into micro-batches, as it does in transformers.)
    """

    def __init__(self, config: QwenConfig):
        super().__init__()
        self.config = config
        self.model = QwenBackbone(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        # Optional constant per head row added to the logits of the training loss ([vocab],
        # fp32): log(m) for a row shared by m ids, -inf for a row that is no id. Only the
        # compact-vocabulary pretraining of data.vocab.subset sets it; never saved.
        self.logit_offset: Optional[torch.Tensor] = None
        if config.tie_word_embeddings:
            self.tie_weights()
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    # ------------------------------------------------------------------ weights
    def tie_weights(self) -> None:
        """Make lm_head share embed_tokens' Parameter (tied models only)."""
        self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def is_tied(self) -> bool:
        head = getattr(self.lm_head, "weight", None)
        return head is not None and head is self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """HF's initialisation: normal(0, std) for linears and embeddings, ones for norms."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, TopKRouter):
                module.weight.normal_(0.0, std)

    def enable_gradient_checkpointing(self, enabled: bool = True) -> "Qwen":
        """Recompute each decoder block in backward (non-reentrant; LoRA/NF4-safe)."""
        self.gradient_checkpointing = enabled
        return self

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        *,
        position_ids: Optional[torch.Tensor] = None,
        document_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
        reduction: str = "mean",
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        aux = labels is not None and self.training and self.config.output_router_logits and self.config.num_experts > 0
        with collect_router_logits() if aux else contextlib.nullcontext() as router_logits:
            hidden = self.hidden_states(
                input_ids,
                position_ids=position_ids,
                document_ids=document_ids,
                attention_mask=attention_mask,
                cache=cache,
            )
        if labels is None:
            logits = self.lm_head(hidden)
            return logits if self.logit_offset is None else logits + self.logit_offset.to(logits.dtype)
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
        loss_sum, n_tokens = self.loss_from_hidden(hidden, labels)
        if aux:
            mask = attention_mask[:, -input_ids.shape[1]:] if attention_mask is not None else None
            balance = load_balancing_loss(router_logits, self.config.num_experts, self.config.num_experts_per_tok, mask)
            loss_sum = loss_sum + self.config.router_aux_loss_coef * balance * n_tokens
        if reduction == "sum":
            return loss_sum, n_tokens
        if reduction != "mean":
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        return loss_sum / n_tokens.clamp_min(1)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: Optional[torch.Tensor] = None,
        document_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
    ) -> torch.Tensor:
        """ids [B, T] -> final-norm hidden states [B, T, hidden]."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, time], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            if document_ids is not None:
                position_ids = document_positions(document_ids)
            elif attention_mask is not None:
                # Left padding: real tokens count from 0 (as HF's generate does).
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        mask = build_attention_mask(
            T, past, document_ids=document_ids, attention_mask=attention_mask, device=input_ids.device
        )
        h = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(position_ids, h.dtype if not torch.is_autocast_enabled(h.device.type)
                                         else torch.get_autocast_dtype(h.device.type))
        use_ckpt = self.gradient_checkpointing and torch.is_grad_enabled() and cache is None
        for layer in self.model.layers:
            if use_ckpt:
                h = checkpoint(layer, h, cos, sin, mask, None, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, cache)
        if cache is not None:
            cache.advance(T)
        return self.model.norm(h)

    def loss_from_hidden(self, hidden: torch.Tensor, labels: torch.Tensor):
        """(loss_sum, n_tokens) of next-token prediction; the head runs in chunks."""
        head = self.lm_head
        # A trainable copy of the head (lora's modules_to_save) exposes the live module as
        # `.active`: unwrap it so the fused chunked loss still applies (it returns the
        # weight gradient as well when the head trains).
        head = getattr(head, "active", head)
        device_type = hidden.device.type
        if type(head) in (nn.Linear, Linear) and head.bias is None:
            weight = head.weight
            if torch.is_autocast_enabled(device_type):
                dtype = torch.get_autocast_dtype(device_type)
                hidden, weight = hidden.to(dtype), weight.to(dtype)
            else:
                hidden = hidden.to(weight.dtype)
            with torch.autocast(device_type, enabled=False):
                return linear_cross_entropy(hidden, weight, labels, logit_offset=self.logit_offset)
        if self.logit_offset is not None:
            raise NotImplementedError("logit_offset needs a plain bias-free head (not a wrapped or biased one)")
        # A wrapped head (e.g. trainable copy, adapter): run it per chunk through autograd.
        targets = labels[:, 1:].reshape(-1)
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        keep = targets != IGNORE_INDEX
        h, targets = h[keep], targets[keep]
        loss_sum = hidden.new_zeros((), dtype=torch.float32)
        chunk = 1024
        for start in range(0, h.shape[0], chunk):
            logits = head(h[start : start + chunk]).float()
            loss_sum = loss_sum + F.cross_entropy(logits, targets[start : start + chunk], reduction="sum")
        return loss_sum, keep.sum()
