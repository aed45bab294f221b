"""Device, dtype and model loading for a stage script: the model as a stage trains it.

    dtype = compute_dtype(args.dtype)                 # "bf16" on a GPU, "fp32" on a CPU
    model = load_model(model_dir, dtype, qlora=args.qlora)
    lora_settings = prepare_for_training(model, args) # seed, checkpointing, adapters per --finetuning
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import torch

from . import options
from .errors import UsageError
from .flags import lora_targets


def device() -> str:
    """cuda (cuda:LOCAL_RANK under torchrun) when there is a GPU, else cpu."""
    if not torch.cuda.is_available():
        return "cpu"
    from train import distributed

    return str(distributed.device()) if distributed.is_distributed() else "cuda"


def compute_dtype(name: Optional[str]) -> str:
    """bf16 on a GPU; fp32 on a CPU, where bf16 matmuls are slower on most processors."""
    if name:
        return name
    return "bf16" if torch.cuda.is_available() else "fp32"


def load_model(path: Path, dtype: str, qlora: bool = False):
    """The model at `path` on this process's device, in `dtype` ("bf16"...), its decoder linears
    in NF4 with `qlora` (or when the checkpoint is saved in 4-bit)."""
    from models.qwen import load
    from models.qwen.config import dtype_from_name
    from quant import quantizer_for

    return load(path, dtype=dtype_from_name(dtype), device=device(), quantize=quantizer_for(path, qlora))


def save_merged(model, model_dir: Path, out: Path, dtype: str, qlora: bool, tokenizer=None) -> None:
    """--out/merged: the trained adapter (already saved in --out/adapter) folded into the base.

    After QLoRA the base in memory is NF4-rounded; the adapter is folded into the original 16-bit
    weights instead (the base read again, as merge.py does by default), so merged/ is the model
    merge.py would write from the same adapter. Rank 0 alone writes.
    """
    import lora
    from models.qwen import save
    from train import distributed

    if not distributed.is_main():
        return
    if qlora:
        model = load_model(model_dir, dtype)
        lora.load(model, out / "adapter")
    lora.merge(model)
    save(model, out / "merged", tokenizer=tokenizer)


def seed_everything(seed: int) -> None:
    """One seed for every source of randomness a run draws from before training starts
    (LoRA's A initialisation among them), so the same command gives the same run."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lora_settings(args: argparse.Namespace):
    """The adapter settings of --lora-* (the one place the flags become a lora.LoRAConfig)."""
    import lora

    return lora.LoRAConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                           use_rslora=args.use_rslora, use_dora=args.use_dora,
                           target_modules=lora_targets(args.lora_targets))


def configure_long_context(model, args: argparse.Namespace) -> None:
    """--long-context-tile / --long-context-from / --offload-activations -> model.long_context."""
    lc = getattr(model, "long_context", None)
    if lc is None:
        return
    lc.mlp_tile = lc.attention_tile = args.long_context_tile
    lc.auto_from = args.long_context_from
    if args.offload_activations:
        if model.device.type == "cpu":
            raise UsageError("--offload-activations needs the model on a GPU: on the CPU the layer inputs "
                             "already live in CPU memory")
        if args.no_grad_checkpointing:
            raise UsageError("--offload-activations offloads what gradient checkpointing keeps: "
                             "drop --no-grad-checkpointing")
    lc.offload_inputs = bool(args.offload_activations)


def prepare_for_training(model, args: argparse.Namespace):
    """Seed, switch gradient checkpointing, and make the --finetuning mode's parameters trainable.

    lora: adapters injected now (the base frozen). full: every parameter trains. full-then-lora:
    every parameter trains first; the returned LoRAConfig is what the Trainer injects at the
    switch. Returns the LoRAConfig of the run (None for full).
    """
    import lora

    seed_everything(args.seed)
    model.enable_gradient_checkpointing(not args.no_grad_checkpointing)
    configure_long_context(model, args)
    if args.finetuning == "full":
        return None
    settings = lora_settings(args)
    if args.finetuning == "lora":
        try:
            lora.inject(model, **settings.inject_kwargs())
        except ValueError as e:
            raise UsageError(f"--lora-targets {args.lora_targets}: {e}") from None
    return settings


def adapter_coverage(model) -> Optional[str]:
    """The one-line report of what the adapters cover ("LoRA on 4 attention + 3×64 expert matrices
    per layer (...)"; routed experts left without one are named), or None without adapters."""
    import lora

    return lora.coverage(model) if lora.adapter_modules(model) else None


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def check_vocab(model_dir: Path, tok, flag: str = "--model") -> None:
    """The embedding must have a row for every token id the tokenizer can produce."""
    from models.qwen import QwenConfig

    rows = QwenConfig.from_hf(model_dir).vocab_size
    if rows < len(tok):
        raise UsageError(f"{flag} {model_dir}: the model has {rows} vocabulary rows but its tokenizer has "
                         f"{len(tok)} tokens (a Qwen checkpoint has 151936 or 152064 rows)")


def train_config(args: argparse.Namespace, out: Path):
    """The train.TrainConfig of a stage's flags."""
    from train import TrainConfig

    return TrainConfig(
        out_dir=str(out), lr=args.lr, lr_scheduler=args.lr_scheduler, warmup_steps=args.warmup_steps,
        warmup_ratio=None if args.warmup_steps is not None else (options.WARMUP_RATIO if args.warmup_ratio is None else args.warmup_ratio),
        epochs=args.epochs if args.max_steps is None else None, max_steps=args.max_steps,   # HF: max_steps wins
        batch_size=args.batch_size, grad_accum=args.grad_accum,
        max_grad_norm=args.max_grad_norm or None, weight_decay=args.weight_decay, dtype=args.dtype,
        grad_checkpointing=not args.no_grad_checkpointing, eval_every=args.eval_every, save_every=args.save_every,
        keep_last=args.keep_last, seed=args.seed, mode=args.finetuning, full_fraction=args.full_fraction or 0.0,
        resume=args.resume, print_every=args.log_every, report_to=args.report_to,
        parallel="fsdp" if args.fsdp else "ddp",
    )


def build_trainer(model, args: argparse.Namespace, out: Path, train_ds, eval_ds, *, lora_config=None,
                  tokenizer=None, objective=None, collate_fn=None, say=print):
    """The stage's train.Trainer, and one line saying what it will do."""
    from data import pad_collate
    from train import Trainer

    cfg = train_config(args, out)
    try:
        trainer = Trainer(model, cfg, train_ds, eval_dataset=eval_ds, collate_fn=collate_fn or pad_collate,
                          objective=objective, lora_config=lora_config, tokenizer=tokenizer, say=say)
    except ValueError as e:
        if "warmup" in str(e):  # only known once the data set size fixes the number of steps
            raise UsageError(f"--warmup-steps {cfg.warmup_steps}: more than the run's steps ({e})") from None
        raise
    world = trainer.dist.world_size   # torchrun: batch size and accumulation are per process
    split = (f"{cfg.batch_size} x {cfg.grad_accum} {trainer.objective.example_name}"
             + (f" on each of {world} processes" if world > 1 else ""))
    mode = {"lora": "LoRA", "full": "all parameters", "full-then-lora": f"all parameters for "
            f"{trainer.switch_step} steps, then LoRA"}[cfg.mode]
    say(f"training ({mode}): {trainer.total_steps} optimizer steps of {split}, warm-up {trainer.warmup} steps, "
        f"peak lr {cfg.lr:g} ({cfg.lr_scheduler} to {cfg.min_lr:g}), dtype {cfg.dtype}")
    return trainer


def summary_line(summary: dict) -> str:
    """One line of a finished run: steps, last training loss, held-out loss, resume point."""
    parts = [f"{summary.get('steps')} steps"]
    if summary.get("final_loss") is not None:
        parts.append(f"last training loss {summary['final_loss']:.4f}")
    ev = summary.get("final_eval")
    if ev:
        parts.append(f"held-out loss {ev['val_loss']:.4f}")
    if summary.get("resumed_from"):
        parts.append(f"resumed from {summary['resumed_from']}")
    return ", ".join(parts)
