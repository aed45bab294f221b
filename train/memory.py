"""Activation memory of one forward pass: the bytes autograd keeps for backward.

    activation_bytes(model, batch)          # -> int, bytes of distinct saved storages

Counts every distinct tensor storage saved for backward during `model(..., reduction="sum")`
(through torch.autograd.graph.saved_tensors_hooks), parameters excluded. With non-reentrant
activation checkpointing, a block saves only its inputs (torch's checkpoint stores them
through an autograd node, which this sees), everything inside the block is recomputed, so
the count is what stays alive between forward and backward. Device-independent, unlike the
allocator's peak, which benchmarks report on a GPU.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


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
