"""Training: our own AdamW, warm-up + cosine, token-normalised accumulation, exact resume.

    from train import TrainConfig, Trainer
    cfg = TrainConfig(out_dir="out", lr=1e-4, min_lr=0.0, warmup_steps=None, warmup_ratio=None,
                      epochs=None, max_steps=None, batch_size=1, grad_accum=16,
                      max_grad_norm=1.0, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8,
                      dtype="bf16", grad_checkpointing=True, eval_every=None, save_every=None,
                      keep_last=2, seed=0, log_every=1, mode="lora",   # "lora" | "full" | "full-then-lora"
                      full_fraction=0.0, nan_policy="stop", max_bad_steps=3, resume=False,
                      warm_start=None, parallel="ddp")   # "ddp" | "fsdp" | "none" (2+ processes)
    trainer = Trainer(model, cfg, train_dataset, eval_dataset=None, collate_fn=None)
    summary = trainer.fit()    # {"steps", "final_loss", "evals", "final_eval", "paths", "interrupted", ...}
    trainer.evaluate()         # {"loss", "ppl", "tokens"}

Datasets are indexable sequences of examples (dicts of 1-D LongTensors or lists: input_ids,
optional labels / position_ids / document_ids / attention_mask); collate_fn turns a list of
them into [B, T] LongTensors (default `data.pad_collate`: right-pad with <|endoftext|>, labels -100).
The model must accept `model(ids, labels=..., reduction="sum") -> (loss_sum, n_supervised)`.

out_dir receives metrics.jsonl (step, loss, lr, grad_norm, tokens_per_s, peak_mem, ...; eval
rows: step, val_loss, val_ppl), checkpoints/step-N/ (trainable weights, PEFT adapter/,
optimizer, RNG, sampler, scaler, schedule, config: see `Trainer.save_checkpoint`), adapter/
at the end (LoRA) and model/ (full training). resume=True continues from the newest complete
checkpoint and reproduces the uninterrupted run bit for bit; warm_start=<dir> loads weights
only. SIGINT/SIGTERM finish the current step, save a checkpoint and return.

Several processes (torchrun): `train.init_from_env()` joins the process group (nccl on CUDA,
gloo on CPU); the Trainer then splits every global batch (batch_size x grad_accum x world
size) over the ranks, with DDP (parallel="ddp") or FSDP2 (parallel="fsdp"); see
train.distributed.

Building blocks, usable on their own:
    AdamW(param_groups(model, weight_decay=0.1), lr=...)      # torch.optim.Optimizer
    cosine_warmup(step, warmup=..., total=..., peak_lr=..., min_lr=0.0)
    resolve_warmup(total, steps=None, ratio=None)
"""

from .batches import MicroBatchSampler
from .checkpoint import CheckpointError, atomic_directory, complete_checkpoints, newest_checkpoint, prune_checkpoints
from .config import ConfigError, TrainConfig
from .distributed import DataParallel, init_from_env
from .guards import NonFiniteError, NothingTrainsError, first_nonfinite
from .loop import Trainer, best_checkpoint, supervised_tokens
from .optim import AdamW, no_decay, param_groups
from .rng import capture_rng_state, restore_rng_state
from .scaler import DynamicLossScaler
from .schedule import cosine_warmup, resolve_warmup

__all__ = [
    "TrainConfig", "Trainer", "AdamW", "param_groups", "no_decay", "cosine_warmup", "resolve_warmup",
    "MicroBatchSampler", "CheckpointError", "ConfigError", "NonFiniteError", "NothingTrainsError",
    "atomic_directory", "complete_checkpoints", "newest_checkpoint", "prune_checkpoints", "best_checkpoint",
    "capture_rng_state", "restore_rng_state", "DynamicLossScaler", "first_nonfinite", "supervised_tokens",
    "activation_bytes", "DataParallel", "init_from_env",
]


def __getattr__(name):
    # Imported on first use so that `python -m train.memory` does not find it pre-imported.
    if name == "activation_bytes":
        from .memory import activation_bytes

        return activation_bytes
    raise AttributeError(f"module 'train' has no attribute {name!r}")
