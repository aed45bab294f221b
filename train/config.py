"""TrainConfig: every knob of a run, validated up front with the flag named in each error."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Optional, Union

from models.qwen import ConfigError

from .phases import full_fraction_problem
from .schedule import SCHEDULES

MODES = ("lora", "full", "full-then-lora")
PARALLEL = ("ddp", "fsdp", "none")
DTYPES = ("bf16", "fp16", "fp32")
NAN_POLICIES = ("stop", "skip")
PROGRESS = ("auto", "bar", "lines", "off")
REPORT_TO = ("none", "tensorboard")


@dataclass
class TrainConfig:
    """Options of one run (defaults in parentheses are what the examples' CLI uses).

    Length: max_steps, or epochs over the training set (default 1 epoch when neither).
    A step is one optimizer update over the global batch: batch_size (per process) x
    grad_accum x the world size (the processes torchrun started; 1 without it).
    Warm-up: warmup_steps or warmup_ratio of the total steps (neither: no warm-up).
    mode: one of MODES: "lora" (train what is trainable: the adapters the caller injected with
    lora.inject), "full" (every parameter), or the two-phase mode (full for the first
    full_fraction of the steps, then the Trainer's `lora_config` is injected into the updated
    model and trained with a fresh optimizer; train.phases).
    lr_scheduler: "cosine" | "linear" | "constant" | "constant_with_warmup" (train.schedule).
    progress: "auto" (a bar on a terminal, else a line every print_every steps), "bar",
    "lines" or "off". report_to: "tensorboard" also writes event files under out_dir/runs.
    nan_policy: "stop" raises at the first non-finite loss/grad; "skip" drops that step and
    raises after max_bad_steps in a row.
    resume: continue from the newest complete checkpoint in out_dir/checkpoints (fresh start
    when there is none). warm_start: a checkpoint or adapter directory whose weights are
    loaded before training, with a fresh optimizer and schedule.
    parallel (only with a torch.distributed process group of 2+ ranks; see train.distributed):
    "ddp" replicates the model and all-reduces the trainable gradients; "fsdp" shards
    parameters, gradients and optimizer state with FSDP2 (mode "full" or "lora", no NF4);
    "none" trains in this process alone.
    """

    out_dir: str = "out"
    lr: float = 1e-4
    min_lr: float = 0.0
    lr_scheduler: str = "cosine"
    warmup_steps: Optional[int] = None
    warmup_ratio: Optional[float] = None
    epochs: Optional[float] = None
    max_steps: Optional[int] = None
    batch_size: int = 1
    grad_accum: int = 16
    max_grad_norm: Optional[float] = 1.0
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    dtype: str = "bf16"
    grad_checkpointing: bool = True
    eval_every: Optional[int] = None
    save_every: Optional[int] = None
    keep_last: int = 2
    seed: int = 0
    log_every: int = 1
    mode: str = "lora"
    full_fraction: float = 0.0
    nan_policy: str = "stop"
    max_bad_steps: int = 3
    resume: bool = False
    save_final: bool = True               # write adapter/ and/or model/ when training ends
    warm_start: Optional[str] = None
    pad_id: Optional[int] = None          # default <|endoftext|> (151643), or 0 for a tiny vocabulary
    eval_batch_size: Optional[int] = None  # default batch_size
    shuffle: bool = True
    progress: Union[str, bool] = "auto"   # see the class docstring; True = "auto", False = "off"
    print_every: Optional[int] = None     # progress lines: default about 20 per run
    report_to: str = "none"
    parallel: str = "ddp"                 # with 2+ processes: "ddp" | "fsdp" | "none"

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if isinstance(self.progress, bool):
            self.progress = "auto" if self.progress else "off"
        self.validate()

    def validate(self) -> None:
        def bad(name: str, expected: str) -> ConfigError:
            return ConfigError(f"TrainConfig.{name}={getattr(self, name)!r}: expected {expected}")

        def positive_int(name: str, optional: bool = False) -> None:
            v = getattr(self, name)
            if optional and v is None:
                return
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad(name, "an int >= 1" + (" or None" if optional else ""))

        for name in ("batch_size", "grad_accum", "keep_last", "log_every", "max_bad_steps"):
            positive_int(name)
        for name in ("max_steps", "eval_every", "save_every", "eval_batch_size", "print_every"):
            positive_int(name, optional=True)
        if self.max_steps is not None and self.epochs is not None:
            raise ConfigError(f"give epochs ({self.epochs}) or max_steps ({self.max_steps}), not both")
        if self.epochs is not None and not (isinstance(self.epochs, (int, float)) and self.epochs > 0):
            raise bad("epochs", "a number > 0 or None")
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ConfigError(f"give warmup_steps ({self.warmup_steps}) or warmup_ratio ({self.warmup_ratio}), not both")
        if self.warmup_steps is not None and (not isinstance(self.warmup_steps, int) or self.warmup_steps < 0):
            raise bad("warmup_steps", "an int >= 0 or None")
        if self.warmup_ratio is not None and not 0.0 <= self.warmup_ratio <= 1.0:
            raise bad("warmup_ratio", "a number in [0, 1] or None")
        if not self.lr > 0:
            raise bad("lr", "a learning rate > 0")
        if not 0 <= self.min_lr <= self.lr:
            raise bad("min_lr", f"a number in [0, lr={self.lr}]")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise bad("max_grad_norm", "a number > 0, or None for no clipping")
        if not self.weight_decay >= 0:
            raise bad("weight_decay", "a number >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise bad("betas", "two numbers in [0, 1)")
        if self.dtype not in DTYPES:
            raise bad("dtype", f"one of {DTYPES}")
        if self.mode not in MODES:
            raise bad("mode", f"one of {MODES}")
        if not 0.0 <= self.full_fraction <= 1.0:
            raise bad("full_fraction", "a number in [0, 1]")
        problem = full_fraction_problem(self.mode, self.full_fraction)
        if problem is not None:
            raise bad("full_fraction", problem)
        if self.parallel not in PARALLEL:
            raise bad("parallel", f"one of {PARALLEL}")
        if self.nan_policy not in NAN_POLICIES:
            raise bad("nan_policy", f"one of {NAN_POLICIES}")
        if self.resume and self.warm_start:
            raise ConfigError("give resume=True or warm_start=<dir>, not both: resume restores the whole run state, "
                              "warm start only the weights")
        if self.lr_scheduler not in SCHEDULES:
            raise bad("lr_scheduler", f"one of {SCHEDULES}")
        if self.progress not in PROGRESS:
            raise bad("progress", f"one of {PROGRESS}")
        if self.report_to not in REPORT_TO:
            raise bad("report_to", f"one of {REPORT_TO}")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown TrainConfig option(s) {unknown}")
        return cls(**d)


# Options that must not change between a checkpoint and its resume: they decide which
# examples each step sees and how the update is formed. The split of the global batch
# (batch_size x grad_accum x world size) may change; the global batch itself may not
# (Trainer.load_checkpoint checks it).
RESUME_FIXED = ("seed", "shuffle", "mode", "full_fraction", "dtype", "lr_scheduler")
BATCH_SPLIT = ("batch_size", "grad_accum", "world_size")
