"""Autoregressive decoding with a per-layer cache (keys/values for softmax attention; conv and
recurrent state for Qwen3.5's linear attention): greedy at temperature 0, else top-k / top-p
sampling."""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence, Union

import torch

from .attention import KVCache
from .model import Qwen

# Prompt tokens per prefill forward (generate's prefill_chunk).
PREFILL_CHUNK = 2048


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Union[torch.Generator, Sequence[torch.Generator], None] = None,
) -> torch.Tensor:
    """Pick one token per row. logits [B, V] -> ids [B]. temperature 0 = argmax.

    generator: one torch.Generator for the batch, or a sequence of B, one per row (row i's draw
    then depends on its own generator only, not on which other rows share the batch)."""
    logits = logits.float()
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop = (cum - sorted_logits.softmax(-1)) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    if generator is not None and not isinstance(generator, torch.Generator):
        if len(generator) != probs.shape[0]:
            raise ValueError(f"{len(generator)} generators for {probs.shape[0]} rows")
        return torch.cat([torch.multinomial(probs[i : i + 1], 1, generator=g) for i, g in enumerate(generator)]).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: Qwen,
    input_ids: torch.Tensor,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_ids: Optional[Iterable[int]] = None,
    *,
    attention_mask: Optional[torch.Tensor] = None,
    pad_id: Optional[int] = None,
    generator: Union[torch.Generator, Sequence[torch.Generator], None] = None,
    stream: Optional[Callable[[torch.Tensor], None]] = None,
    prefill_chunk: Optional[int] = PREFILL_CHUNK,
) -> torch.Tensor:
    """Continue `input_ids` [B, T] by up to `max_new_tokens`; returns [B, T + n].

    The prompt is one forward pass (Qwen3.5's linear attention: the chunked delta rule), then
    one token per step (its recurrence). Batches of different prompt lengths are left-padded
    with `attention_mask` [B, T] (1 = real token; padding never enters a recurrent state). A
    row stops at its first eos id (default: the config's eos); after that it is filled with
    `pad_id` (default: the first eos id). `generator`: see sample_next. `stream(ids [B])` is called with
    every new column, for printing tokens as they come.

    prefill_chunk: a prompt longer than this goes into the cache that many tokens at a time
    (chunked prefill), so the prompt's activations, attention masks and logits are never held
    for all T positions at once (only the last chunk reaches the head); None or 0: one pass.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    was_training = model.training
    model.eval()
    eos = list(eos_ids) if eos_ids is not None else model.config.eos_ids()
    pad = pad_id if pad_id is not None else (eos[0] if eos else 0)
    B, T = input_ids.shape
    if T == 0:  # Qwen has no BOS to start from; a document starts after <|endoftext|>
        raise ValueError("generate: input_ids is empty (give at least one token, e.g. <|endoftext|> for a new document)")
    device = input_ids.device
    dtype = model.dtype
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
    cache = KVCache(model.config, B, T + max_new_tokens, device=device, dtype=dtype)
    mask = attention_mask.to(device) if attention_mask is not None else None
    positions = None
    if mask is not None:
        positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
    out = input_ids
    done = torch.zeros(B, dtype=torch.bool, device=device)
    eos_t = torch.tensor(eos, device=device) if eos else None
    step_ids = input_ids
    try:
        if prefill_chunk and T > prefill_chunk:
            last = (T - 1) // prefill_chunk * prefill_chunk  # the final chunk goes through the loop below
            for s in range(0, last, prefill_chunk):
                e = s + prefill_chunk
                model.hidden_states(input_ids[:, s:e], position_ids=positions[:, s:e] if positions is not None else None,
                                    attention_mask=mask[:, :e] if mask is not None else None, cache=cache)
            step_ids = input_ids[:, last:]
            if positions is not None:
                positions = positions[:, last:]
        for step in range(max_new_tokens):
            logits = model(step_ids, position_ids=positions, attention_mask=mask, cache=cache)[:, -1]
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            out = torch.cat([out, nxt[:, None]], dim=1)
            if stream is not None:
                stream(nxt)
            if eos_t is not None:
                done = done | torch.isin(nxt, eos_t)
            if bool(done.all()):
                break
            step_ids = nxt[:, None]
            if mask is not None:
                mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=device)], dim=1)
                positions = positions[:, -1:] + 1
    finally:
        model.train(was_training)
    return out
