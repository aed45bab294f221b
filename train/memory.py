"""Activation memory of one forward pass: the bytes autograd keeps for backward, and the memory
model: the peak bytes of one training step predicted from the shape, the length and the options.

    activation_bytes(model, batch)                  # -> int, bytes of distinct saved storages (measured)
    predict_peak_bytes(config, seq, MemoryOptions(...))        # -> int, predicted peak of one step
    predict_activation_bytes(config, seq, opts)     # -> int, its activation part (peak over the step)
    minimum_activation_bytes_per_token(config, opts)  # what the chosen options cannot go below

Counts every distinct tensor storage saved for backward during `model(..., reduction="sum")`
(through torch.autograd.graph.saved_tensors_hooks), parameters excluded. With non-reentrant
activation checkpointing, a block saves only its inputs (torch's checkpoint stores them
through an autograd node, which this sees), everything inside the block is recomputed, so
the count is what stays alive between forward and backward. Device-independent, unlike the
allocator's peak, which benchmarks report on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

# The CPU RSS of the interpreter with torch, transformers-free, before a model exists (this
# library's import of torch + numpy + tokenizer libs on Linux x86-64, measured: ~0.33 GiB).
RUNTIME_BYTES = 350 * 2**20


@dataclass
class MemoryOptions:
    """The options of a training step that decide its memory (train/memory.py's model).

    dtype: the weights' and activations' dtype (bf16: 2 bytes, fp32: 4); lora_rank: 0 = full
    fine-tuning (every parameter gets a grad and two AdamW states in fp32), else LoRA on all 7
    linears of every layer (adapter fp32 + grad + AdamW); qlora: the frozen linears in NF4
    (0.5 byte + block absmax); checkpointing: keep only each layer's input; mlp_tile / tiled:
    the MLP's tokens per tile when the step is long enough for Qwen.long_context to switch it on
    (0 = never tiled); loss_chunk_elements: logits per chunk of the chunked loss (loss.py);
    runtime_bytes: the process before the model (RUNTIME_BYTES).
    """

    dtype: torch.dtype = torch.bfloat16
    lora_rank: int = 16
    qlora: bool = False
    checkpointing: bool = True
    mlp_tile: int = 4096
    auto_from: int = 8192
    loss_chunk_elements: int = 32 * 1024 * 1024
    batch: int = 1
    runtime_bytes: int = RUNTIME_BYTES


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _layer_bytes_per_token(cfg, a: int, mlp_tokens_share: float) -> float:
    """Bytes one decoder layer's forward saves for its backward, per token.

    Counted on this library's layer (tests/train/test_memory_model.py checks it against
    activation_bytes): the norms' fp32 upcasts and outputs, q/k/v before and after RoPE, the
    attention output and its logsumexp, o_proj's output, the residual; 4 [intermediate] tensors
    of the SwiGLU (gate, up, silu, product), which a tiled MLP holds for one tile only.
    """
    d, q, kv, i = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    norms = 2 * (4 + (a if a != 4 else 0)) * d    # two RMSNorms: the fp32 input (a copy unless fp32), output
    attn = a * (2 * q + 4 * kv + q) + 4 * cfg.num_attention_heads  # q,k,v (+rope'd), attention out, lse
    residual = a * d
    return norms + attn + residual + 4 * a * i * mlp_tokens_share


def _per_token(cfg, n: int, opts: MemoryOptions) -> tuple[float, float]:
    """(bytes per token kept from forward to backward, bytes per token of the backward's working set)."""
    a = _bytes(opts.dtype)
    d = cfg.hidden_size
    tiled = opts.mlp_tile > 0 and n > opts.auto_from
    share = min(1.0, opts.mlp_tile / n) if tiled else 1.0
    rope = 2 * a * cfg.rotary_dim                                   # cos, sin tables
    final = (4 + a) * d                                             # final norm's saved input, d loss / d hidden
    layer = _layer_bytes_per_token(cfg, a, share)
    L = cfg.num_hidden_layers
    # Backward of the MLP holds the gradients of its four [intermediate] tensors beside them.
    mlp_grads = 4 * a * cfg.intermediate_size * share
    if opts.checkpointing:
        return L * a * d + rope + final, layer + mlp_grads + 3 * a * d
    return L * layer + rope + final, mlp_grads + 3 * a * d


def predict_saved_bytes(cfg, seq: int, opts: MemoryOptions = MemoryOptions()) -> int:
    """Activation bytes kept from the forward to the backward (what activation_bytes measures)."""
    n = opts.batch * seq
    return int(n * _per_token(cfg, n, opts)[0])


def predict_activation_bytes(cfg, seq: int, opts: MemoryOptions) -> int:
    """Peak activation bytes of one step (forward, chunked loss, backward) at `seq` tokens per row.

    With checkpointing: every layer's input [T, hidden] is kept, plus the final norm and the
    loss's gradient of the hidden states; the peak comes while one layer is recomputed and its
    backward runs (that layer's saved tensors, the MLP's gradients, three [T, hidden] gradients;
    a tiled MLP: one tile of its part) or during the loss
    (one chunk of logits in the head's dtype and its fp32 scratch). Without: every layer's saved
    tensors at once.
    """
    n = opts.batch * seq
    kept, working = _per_token(cfg, n, opts)
    a = _bytes(opts.dtype)
    V = cfg.vocab_size
    chunk = max(1, opts.loss_chunk_elements // V)
    # The logits buffer [chunk, V] in the head's dtype, and the fp32 softmax scratch: chunk rows
    # for bf16 on a CPU (its matmul goes through fp32), 8 rows otherwise (loss.py).
    rows = min(chunk, n)
    loss_chunk = rows * V * a + (rows if a == 2 else 8) * V * 4
    return int(n * kept + max(n * working, loss_chunk))


def _parameter_bytes(cfg, opts: MemoryOptions) -> int:
    a = _bytes(opts.dtype)
    total = cfg.num_parameters()
    d, L = cfg.hidden_size, cfg.num_hidden_layers
    linears = L * (d * cfg.q_size + 2 * d * cfg.kv_size + cfg.q_size * d + 3 * d * cfg.intermediate_size)
    if opts.lora_rank <= 0:
        return total * a + total * (4 + 8)            # weights, fp32 grad, two AdamW states
    r = opts.lora_rank
    adapter = L * r * ((d + cfg.q_size) + 2 * (d + cfg.kv_size) + (cfg.q_size + d) + 3 * (d + cfg.intermediate_size))
    frozen = (total - linears) * a + (linears * (0.5 + 4 / 64) if opts.qlora else linears * a)
    return int(frozen + adapter * (4 + 4 + 8))


def predict_peak_bytes(cfg, seq: int, opts: MemoryOptions = MemoryOptions()) -> int:
    """Predicted peak memory (CPU: RSS) of one training step at `seq` tokens per row: the runtime,
    the weights, the trainable state (grads, AdamW), and the activations' peak."""
    return int(opts.runtime_bytes + _parameter_bytes(cfg, opts) + predict_activation_bytes(cfg, seq, opts))


def minimum_activation_bytes_per_token(cfg, opts: MemoryOptions = MemoryOptions()) -> float:
    """The floor of activation bytes per token for checkpointing that keeps each layer's input:
    those inputs (L x hidden), plus what recomputing one attention layer must hold whole (its
    input, q, k, v and attention output) and the gradient flowing through it. Without
    checkpointing, every layer's saved tensors (the MLP tiled)."""
    a = _bytes(opts.dtype)
    d, L = cfg.hidden_size, cfg.num_hidden_layers
    one_attention = a * (d + 2 * cfg.q_size + 2 * cfg.kv_size) + a * d
    if not opts.checkpointing:
        return L * _layer_bytes_per_token(cfg, a, 0.0)
    return L * a * d + one_attention


def activation_bytes(model: nn.Module, batch: dict, autocast_dtype: Optional[torch.dtype] = None) -> int:
    """Bytes saved for backward by one training forward of `batch` (then backward runs to free them)."""
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in param_storages and ptr != 0:
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return t

    extras = {k: batch[k] for k in ("position_ids", "document_ids", "attention_mask") if k in batch}
    ctx = torch.autocast(next(model.parameters()).device.type, dtype=autocast_dtype) if autocast_dtype else None
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if ctx is not None:
            with ctx:
                loss, _ = model(batch["input_ids"], labels=batch["labels"], reduction="sum", **extras)
        else:
            loss, _ = model(batch["input_ids"], labels=batch["labels"], reduction="sum", **extras)
    if loss.requires_grad:
        loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def _main(argv=None) -> None:
    """python -m train.memory --preset qwen2.5-0.5b --layers 4 --batch 1 --seq 1024 [--lora] [--bf16]"""
    import argparse
    import time

    import lora
    from models.qwen import Qwen, QwenConfig

    ap = argparse.ArgumentParser(prog="python -m train.memory", description=_main.__doc__)
    ap.add_argument("--preset", default="qwen2.5-0.5b")
    ap.add_argument("--layers", type=int, default=4, help="decoder blocks (activation memory scales with them)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--lora", action="store_true", help="frozen base + LoRA r=16 on all linears")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 weights)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = Qwen(QwenConfig.preset(args.preset, num_hidden_layers=args.layers, torch_dtype="float32"))
    if args.lora:
        lora.inject(model, r=16, alpha=16)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq))
    batch = {"input_ids": ids, "labels": ids}
    dtype = torch.bfloat16 if args.bf16 else None
    out = {}
    for on in (False, True):
        model.enable_gradient_checkpointing(on)
        t0 = time.perf_counter()
        out[on] = (activation_bytes(model, batch, dtype), time.perf_counter() - t0)
    (off_b, off_t), (on_b, on_t) = out[False], out[True]
    print(f"{args.preset} x{args.layers} layers, batch {args.batch} x {args.seq}, lora={args.lora}, bf16={args.bf16}")
    print(f"  saved for backward: {off_b / 2**20:.1f} MiB without checkpointing, {on_b / 2**20:.1f} MiB with "
          f"({on_b / off_b:.3f}x); fwd+bwd {off_t:.2f}s vs {on_t:.2f}s")


if __name__ == "__main__":
    _main()
