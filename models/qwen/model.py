"""The Qwen decoder, written from scratch; module names are the HF checkpoint names.

    Qwen
    ├── model: QwenBackbone
    │   ├── embed_tokens: Embedding [vocab, hidden]
    │   ├── layers.{i}: DecoderLayer
    │   │   ├── input_layernorm: RMSNorm
    │   │   ├── self_attn: Attention (q_proj, k_proj, v_proj, o_proj[, q_norm, k_norm])
    │   │   │   or, on Qwen3.5's "full_attention" layers, GatedAttention (same names)
    │   │   ├── linear_attn: GatedDeltaNet, instead of self_attn on Qwen3.5's "linear_attention" layers
    │   │   │   (Qwen3-Next: FusedGatedDeltaNet, in_proj_qkvz + in_proj_ba, families/qwen3_next.py)
    │   │   ├── post_attention_layernorm: RMSNorm
    │   │   └── mlp: SwiGLU (gate_proj, up_proj, down_proj), or in a Qwen3-MoE sparse layer
    │   │            SparseMoeBlock (gate: router [E, hidden]; experts.{e}: SwiGLU), or in
    │   │            Qwen3.5-MoE / Qwen3-Next SharedExpertMoeBlock (+ shared_expert: SwiGLU, shared_expert_gate)
    │   └── norm: RMSNorm (Qwen3.5: ZeroCentredRMSNorm, everywhere)
    └── lm_head: Linear [vocab, hidden] (the same Parameter as embed_tokens when tied)

So `model.state_dict()` keys are checkpoint keys: no conversion tables. Which attention, norm
and linear-attention class a layer gets is the family's (`config.family`, models/qwen/families).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import BlockedMask, KVCache, build_attention_mask
from .config import LINEAR_ATTENTION, QwenConfig, merge_eos
from .errors import ConfigError
from .layers import RMSNorm, SwiGLU, tiled
from .linear import Linear
from .linear_attention import GatedDeltaNet, GatedRMSNorm
from .loss import IGNORE_INDEX, linear_cross_entropy, linear_log_probs
from .module_tree import RunsInPlace
from .moe import SharedExpertMoeBlock, SparseMoeBlock, TopKRouter, collect_router_logits, load_balancing_loss
from .qwen35 import ZeroCentredRMSNorm
from .rope import RotaryEmbedding
from .special_tokens import ENDOFTEXT_ID, IM_END_ID


def norm_class(config: QwenConfig) -> type[nn.Module]:
    """The block and final norms (Qwen3.5 stores them zero-centred: norm(x) * (1 + w))."""
    return config.family.norm_class()


def make_mlp(config: QwenConfig, layer_idx: int) -> nn.Module:
    """The MLP of decoder layer `layer_idx`: x [B, T, hidden] -> [B, T, hidden].

    A Qwen3-MoE sparse layer gets the router + experts block, a Qwen3.5-MoE layer (every one is
    sparse) the same plus its gated shared expert, every other layer the dense SwiGLU of
    `intermediate_size`. Other block types plug in here.
    """
    if config.is_sparse_layer(layer_idx):
        return SharedExpertMoeBlock(config) if config.shared_expert_intermediate_size else SparseMoeBlock(config)
    return SwiGLU(config.hidden_size, config.intermediate_size)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + mixer(norm(x)), then h + mlp(norm(h)). [B, T, hidden] -> same.

    The token mixer is `self_attn` (softmax attention; Qwen3.5: gated) or, on Qwen3.5's
    linear-attention layers, `linear_attn` (Gated DeltaNet); `layer_type` says which.
    """

    def __init__(self, config: QwenConfig, layer_idx: int):
        super().__init__()
        norm = norm_class(config)
        self.layer_type = config.layer_type(layer_idx)
        self.input_layernorm = norm(config.hidden_size, config.rms_norm_eps)
        if self.layer_type == LINEAR_ATTENTION:
            self.linear_attn = config.family.linear_attention_class()(config, layer_idx)
        else:
            self.self_attn = config.family.attention_class()(config, layer_idx)
        self.post_attention_layernorm = norm(config.hidden_size, config.rms_norm_eps)
        self.mlp = make_mlp(config, layer_idx)

    def forward(self, x, cos, sin, mask=None, cache: Optional[KVCache] = None, document_ids=None, padding_mask=None,
                mlp_tile: int = 0):
        """mask: the attention mask (full attention); document_ids / padding_mask [B, T]: what
        linear attention needs instead (document starts, padding tokens to ignore). mlp_tile > 0:
        a dense MLP runs that many tokens at a time (layers.tiled; MoE blocks run whole)."""
        h = self.input_layernorm(x)
        if self.layer_type == LINEAR_ATTENTION:
            h = self.linear_attn(h, cache, document_ids=document_ids, padding_mask=padding_mask)
        else:
            h = self.self_attn(h, cos, sin, mask, cache)
        h = x + h
        h_norm = self.post_attention_layernorm(h)
        if mlp_tile > 0 and isinstance(self.mlp, SwiGLU):
            return h + tiled(self.mlp, h_norm, mlp_tile)
        return h + self.mlp(h_norm)


@dataclass
class LongContext:
    """How a forward keeps activation memory linear in its length (Qwen.long_context).

    A forward of more than `auto_from` tokens (batch x length; 0: every forward) without a KV
    cache runs each dense MLP `mlp_tile` tokens at a time (layers.tiled: the [T, intermediate]
    activations never exist whole) and, when it needs a mask (packed documents, padding), builds
    that mask `attention_tile` queries at a time instead of [T, T] (attention.BlockedMask; the
    plain causal case never builds one). Both are exact: the same sums on fewer rows, recomputed in
    backward. 0 switches a tiling off. Below `auto_from` nothing changes (no recompute, no
    speed cost at training lengths).

    offload_inputs: with gradient checkpointing on a GPU, the layer inputs checkpointing keeps
    ([B, T, hidden] per layer) wait in pinned CPU memory until backward needs them. Refused on
    the CPU, where they already are in CPU memory.
    """

    mlp_tile: int = 4096
    attention_tile: int = 4096
    auto_from: int = 8192
    offload_inputs: bool = False

    def applies(self, n_tokens: int) -> bool:
        return n_tokens > self.auto_from


def offload_context(device: torch.device, enabled: bool):
    """The context that moves tensors saved for backward to CPU memory (pinned on a GPU) while
    `enabled`; a null context otherwise. Refuses a CPU device (see LongContext.offload_inputs)."""
    if not enabled:
        return contextlib.nullcontext()
    if device.type == "cpu":
        raise ConfigError("offload of activations (--offload-activations) needs the model on a GPU: "
                          "on the CPU the layer inputs already live in CPU memory")
    return torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")


class QwenBackbone(nn.Module):
    """Embeddings, decoder blocks and final norm: ids [B, T] -> hidden [B, T, hidden]."""

    def __init__(self, config: QwenConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = norm_class(config)(config.hidden_size, config.rms_norm_eps)
        # Partial rotary (Qwen3.5): the tables cover the rotated leading dims of a head only.
        self.rotary_emb = RotaryEmbedding(config.rotary_dim, config.rope_theta, config.rope_scaling)


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """Per-document positions: [B, T] document ids -> [B, T] positions restarting at 0."""
    B, T = document_ids.shape
    idx = torch.arange(T, device=document_ids.device).expand(B, T)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_idx


class Qwen(nn.Module):
    """Qwen2 / Qwen2.5 / Qwen3 / Qwen3-MoE / Qwen3.5 (text) / Qwen3-Next causal LM.

    forward(input_ids [B, T]) -> logits [B, T, vocab]
    forward(input_ids, labels=[B, T]) -> mean loss over labels != -100 (shifted inside)
    forward(..., reduction="sum") -> (loss_sum, n_supervised_tokens), for accumulation
    forward(..., reduction="none") -> (loss per row [B], supervised tokens per row [B]): a
        row's loss is -sum of log p(label) over its supervised positions (preference objectives)

    Qwen3-MoE with `config.output_router_logits`, in training mode: the loss also holds
    router_aux_loss_coef x the load-balancing loss of the batch, as transformers' loss does (in
    eval mode the loss is the cross-entropy alone: perplexity). With reduction="sum" that term
    is weighted by the batch's supervised tokens (loss_sum + coef * aux * n), so the trainer's
    sum over micro-batches / N (supervised tokens of the optimizer step) is the token-mean
    cross-entropy plus coef x the token-weighted mean of the micro-batches' aux losses: one
    micro-batch gives exactly transformers' loss, and no split of the step changes the weight a
    token's micro-batch gets. (The aux loss itself is a per-batch statistic: it depends on how
    the step is cut into micro-batches, as it does in transformers.) With reduction="none" each
    row gets coef * aux * its own supervised tokens.
    """

    def __init__(self, config: QwenConfig):
        super().__init__()
        self.config = config
        self.model = QwenBackbone(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.long_context = LongContext()
        # generation_config.json as loaded (written back by save, with eos/pad from the config),
        # and the directory the model was loaded from (None for a model built in memory).
        self.generation_config: dict = {}
        self.name_or_path: Optional[str] = None
        # A checkpoint holding more than this text model (Qwen3.5's vision tower and MTP head):
        # what save() needs to write it back whole (models/qwen/whole.py); None otherwise.
        self.checkpoint_source = None
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
        """HF's initialisation: normal(0, std) for linears, convs and embeddings, ones for norms
        (zeros for zero-centred ones); Qwen3.5's decay parameters as Qwen3_5GatedDeltaNet's."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d)):
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std)
            elif isinstance(module, (RMSNorm, GatedRMSNorm)):
                module.weight.fill_(1.0)
            elif isinstance(module, ZeroCentredRMSNorm):
                module.weight.zero_()
            elif isinstance(module, GatedDeltaNet):
                module.init_decay()
            elif isinstance(module, TopKRouter):
                module.weight.normal_(0.0, std)

    def use_chat_eos(self) -> "Qwen":
        """Make <|im_end|> the eos in config.json and the first eos of generation_config.json
        (pad stays <|endoftext|>), so generation from a chat-tuned model stops where the turn
        ends; the ids generation_config.json listed stay after it (HF's generate stops at each)."""
        self.config.eos_token_id = IM_END_ID
        self.config.pad_token_id = ENDOFTEXT_ID
        eos = merge_eos(IM_END_ID, self.generation_config.get("eos_token_id"))
        self.generation_config.update(eos_token_id=eos, pad_token_id=ENDOFTEXT_ID)
        return self

    def enable_gradient_checkpointing(self, enabled: bool = True) -> "Qwen":
        """Recompute each decoder block in backward (non-reentrant; safe with adapter and 4-bit layers)."""
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
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        loss, n_tokens = self.loss_from_hidden(hidden, labels, per_row=reduction == "none")
        if aux:
            mask = attention_mask[:, -input_ids.shape[1]:] if attention_mask is not None else None
            balance = load_balancing_loss(router_logits, self.config.num_experts, self.config.num_experts_per_tok, mask)
            loss = loss + self.config.router_aux_loss_coef * balance * n_tokens
        if reduction == "mean":
            return loss / n_tokens.clamp_min(1)
        return loss, n_tokens

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
        lc = self.long_context
        long = cache is None and lc.applies(B * T)
        if long and lc.attention_tile > 0 and (document_ids is not None or attention_mask is not None):
            mask = BlockedMask(lc.attention_tile, document_ids=document_ids, attention_mask=attention_mask)
        else:
            mask = build_attention_mask(
                T, past, document_ids=document_ids, attention_mask=attention_mask, device=input_ids.device
            )
        mlp_tile = lc.mlp_tile if long else 0
        # Linear attention takes the padding of the new tokens instead of a mask (one new
        # token is never padding).
        padding_mask = attention_mask[:, -T:] if attention_mask is not None and T > 1 else None
        h = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(position_ids, h.dtype if not torch.is_autocast_enabled(h.device.type)
                                         else torch.get_autocast_dtype(h.device.type))
        use_ckpt = self.gradient_checkpointing and torch.is_grad_enabled() and cache is None
        with offload_context(h.device, use_ckpt and lc.offload_inputs):
            for layer in self.model.layers:
                if use_ckpt:
                    h = checkpoint(layer, h, cos, sin, mask, None, document_ids, padding_mask, mlp_tile,
                                   use_reentrant=False)
                else:
                    h = layer(h, cos, sin, mask, cache, document_ids, padding_mask, mlp_tile)
        if cache is not None:
            cache.advance(T)
        return self.model.norm(h)

    def loss_from_hidden(self, hidden: torch.Tensor, labels: torch.Tensor, per_row: bool = False):
        """(loss_sum, n_tokens) of next-token prediction; the head runs in chunks.

        per_row: ([B] loss sums, [B] counts) instead of scalars, one per row of labels.
        """
        head = self.lm_head
        # A wrapper of the head (a trainable copy) declares the module it runs (module_tree.RunsInPlace):
        # look through it so the fused chunked loss still applies (it returns the weight gradient
        # as well when the head trains).
        if isinstance(head, RunsInPlace):
            head = head.live_module()
        device_type = hidden.device.type
        if type(head) in (nn.Linear, Linear) and head.bias is None:
            weight = head.weight
            if torch.is_autocast_enabled(device_type):
                dtype = torch.get_autocast_dtype(device_type)
                hidden, weight = hidden.to(dtype), weight.to(dtype)
            else:
                hidden = hidden.to(weight.dtype)
            with torch.autocast(device_type, enabled=False):
                if per_row:
                    logps, n_tokens = linear_log_probs(hidden, weight, labels, logit_offset=self.logit_offset)
                    return -logps, n_tokens
                return linear_cross_entropy(hidden, weight, labels, logit_offset=self.logit_offset)
        if self.logit_offset is not None:
            raise NotImplementedError("logit_offset needs a plain bias-free head (not a wrapped or biased one)")
        # A wrapped head (e.g. trainable copy, adapter): run it per chunk through autograd.
        targets = labels[:, 1:].reshape(-1)
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        keep = targets != IGNORE_INDEX
        rows = torch.arange(labels.shape[0], device=labels.device).repeat_interleave(labels.shape[1] - 1)[keep]
        h, targets = h[keep], targets[keep]
        loss = hidden.new_zeros(labels.shape[0] if per_row else (), dtype=torch.float32)
        chunk = 1024
        for start in range(0, h.shape[0], chunk):
            logits = head(h[start : start + chunk]).float()
            t = targets[start : start + chunk]
            if per_row:
                loss = loss.index_add(0, rows[start : start + chunk], F.cross_entropy(logits, t, reduction="none"))
            else:
                loss = loss + F.cross_entropy(logits, t, reduction="sum")
        return loss, keep.view(labels.shape[0], -1).sum(1) if per_row else keep.sum()
