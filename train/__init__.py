"""Training: our own AdamW, warm-up + cosine, token-normalised accumulation, exact resume.

    from train import TrainConfig, Trainer
    cfg = TrainConfig(out_dir="out", lr=1e-4, min_lr=0.0, lr_scheduler="cosine", warmup_steps=None,
                      warmup_ratio=None, epochs=None, max_steps=None, batch_size=1, grad_accum=16,
                      max_grad_norm=1.0, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8,
                      dtype="bf16", grad_checkpointing=True, eval_every=None, save_every=None,
                      keep_last=2, seed=0, log_every=1, mode="lora",   # one of train.config.MODES (train.phases)
                      full_fraction=0.0, nan_policy="stop", max_bad_steps=3, resume=False,
                      warm_start=None, parallel="ddp", progress="auto", report_to="none")
    trainer = Trainer(model, cfg, train_dataset, eval_dataset=None, collate_fn=None,
                      objective=None, lora_config=None, tokenizer=None)
    summary = trainer.fit()    # {"steps", "final_loss", "evals", "final_eval", "paths", ...}
    trainer.evaluate()         # {"loss", "ppl", "tokens"}

Modules, one job each:
    loop.py         the Trainer: the loop, accumulation, evaluation, checkpoint save/restore calls
    objective.py    what a step minimises (the language-model loss; preference.py for DPO & co.)
    config.py       TrainConfig, validated up front
    phases.py       what trains when: the FineTuningPlan of the mode (the switch, checkpoint, export)
    checkpoint/     checkpoint files, step-N directories (retention, crash recovery), their content
    export.py       the final outputs: adapter/ and/or model/, with the tokenizer
    metrics_log.py  metrics.jsonl, TensorBoard events, progress bar or progress lines
    signals.py      SIGINT/SIGTERM: finish the step, checkpoint, raise Interrupted
    perplexity.py   perplexity: exp of the token-weighted loss (Trainer.evaluate), sliding windows over
                    whole documents (evaluate.py)
    optim.py, schedule.py, scaler.py, rng.py, guards.py, batches.py, distributed.py, memory.py

Datasets are indexable sequences of examples (dicts of 1-D LongTensors or lists: input_ids,
optional labels / position_ids / document_ids / attention_mask); collate_fn turns a list of
them into [B, T] LongTensors (default `data.pad_collate`: right-pad with <|endoftext|>, labels -100).
The model must accept `model(ids, labels=..., reduction="sum") -> (loss_sum, n_supervised)`.

out_dir receives metrics.jsonl, checkpoints/step-N/, adapter/ at the end (LoRA) and model/
(full training). resume=True continues from the newest complete checkpoint and reproduces the
uninterrupted run bit for bit; warm_start=<dir> loads weights only. SIGINT/SIGTERM finish the
current step, save a checkpoint and raise `train.Interrupted`.

Several processes (torchrun): `train.init_from_env()` joins the process group (nccl on CUDA,
gloo on CPU); the Trainer then splits every global batch (batch_size x grad_accum x world
size) over the ranks, with DDP (parallel="ddp") or FSDP2 (parallel="fsdp"); see
train.distributed.

Building blocks, usable on their own:
    AdamW(param_groups(model, weight_decay=0.1), lr=...)      # torch.optim.Optimizer
    cosine_warmup(step, warmup=..., total=..., peak_lr=..., min_lr=0.0)
    resolve_warmup(total, steps=None, ratio=None)
"""

import _qwen_tune

_qwen_tune.claim(__name__)  # our sibling packages, not a user's same-named files (see _qwen_tune)

from models.qwen import CheckpointError, ConfigError

from .batches import MicroBatchSampler
from .checkpoint import atomic_directory, best_checkpoint, complete_checkpoints, newest_checkpoint, prune_checkpoints
from .config import TrainConfig
from .distributed import DataParallel, init_from_env
from .guards import NonFiniteError, NothingTrainsError, first_nonfinite
from .loop import Trainer
from .objective import LanguageModelLoss, Objective, supervised_tokens
from .phases import FineTuningPlan
from .optim import AdamW, no_decay, param_groups
from .perplexity import perplexity_of
from .rng import capture_rng_state, restore_rng_state
from .scaler import DynamicLossScaler
from .schedule import cosine_warmup, learning_rate, resolve_warmup
from .signals import Interrupted

__all__ = [
    "TrainConfig", "Trainer", "AdamW", "param_groups", "no_decay", "cosine_warmup", "learning_rate", "resolve_warmup",
    "MicroBatchSampler", "CheckpointError", "ConfigError", "NonFiniteError", "NothingTrainsError", "Interrupted",
    "atomic_directory", "complete_checkpoints", "newest_checkpoint", "prune_checkpoints", "best_checkpoint",
    "capture_rng_state", "restore_rng_state", "DynamicLossScaler", "first_nonfinite", "supervised_tokens",
    "LanguageModelLoss", "Objective", "perplexity_of", "activation_bytes", "DataParallel",
    "init_from_env", "FineTuningPlan",
]


def __getattr__(name):
    # Imported on first use so that `python -m train.memory` does not find it pre-imported.
    if name == "activation_bytes":
        from .memory import activation_bytes

        return activation_bytes
    raise AttributeError(f"module 'train' has no attribute {name!r}")
