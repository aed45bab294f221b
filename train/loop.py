"""The training loop: one class, read top to bottom in `fit`.

    trainer = Trainer(model, TrainConfig(out_dir="out", max_steps=100, grad_accum=8), train_ds, eval_ds)
    summary = trainer.fit()       # {"steps", "final_loss", "evals", "final_eval", "paths", ...}
    trainer.evaluate()            # {"loss", "ppl", "tokens"} over eval_ds

The loop trains whatever is trainable: inject adapters first (lora.inject) for mode="lora";
mode="full" trains every parameter; the two-phase mode trains every parameter for the first
`full_fraction` of the steps, then injects `lora_config` and trains the adapters. Which phase
a step is in, the switch, and what a checkpoint and the export hold in each phase: the run's
`FineTuningPlan` (train.phases), which the loop asks.

One optimizer step:
  1. draw all `grad_accum` micro-batches of the step and count their units N (the objective's
     count: supervised tokens for the language-model loss, pairs for preference losses);
  2. for each micro-batch: (loss_sum, metrics) = objective(model, batch); backward(loss_sum / N)
     — so the gradient is that of the mean over every unit of the whole step, whatever the split
     into micro-batches and however long each sequence is;
  3. (fp16) unscale, skip on overflow; clip to max_grad_norm; non-finite guard;
  4. AdamW at lr = schedule(step); first update of a phase: every trainable parameter had a
     finite gradient and every LoRA B moved.
Every `save_every` steps and at the end the whole state goes to out_dir/checkpoints/step-N
(train.checkpoint); resume=True continues from the newest. SIGINT/SIGTERM finish the current
step, save a checkpoint and raise `Interrupted` (nothing final is written).

Under torchrun (a torch.distributed process group of W ranks, see train.distributed), each
rank takes its share of every micro-batch of the global batch (batch_size x grad_accum x W),
N in step 1 is summed over the ranks, gradients are averaged by DDP or FSDP2 on the last
micro-batch, and rank 0 alone writes metrics, checkpoints and the final outputs.
"""

from __future__ import annotations

import math
import os
import resource
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

import lora
from data import pad_collate
from fileio.atomic import recover_all
from models.qwen import CheckpointError, ENDOFTEXT_ID
from models.qwen.config import dtype_from_name
from quant import NF4Linear

from . import checkpoint as ckpt
from .batches import MicroBatchSampler
from .config import BATCH_SPLIT, RESUME_FIXED, TrainConfig
from .distributed import DataParallel, rank_seed
from .export import save_final
from .guards import NonFiniteError, NothingTrainsError, check_gradients_present, check_lora_b_moved, first_nonfinite, lora_b_snapshot
from .metrics_log import MetricsLog, Progress
from .objective import LanguageModelLoss, Objective
from .optim import AdamW, param_groups
from .perplexity import perplexity_of
from .phases import FineTuningPlan
from .rng import capture_rng_state, restore_rng_state
from .scaler import DynamicLossScaler
from .schedule import learning_rate, resolve_warmup
from .signals import Interrupted, StopSignals



@dataclass
class StepResult:
    """What `accumulate` measured over a step's micro-batches (summed over the ranks)."""

    loss_sum: float
    count: int                      # the objective's units (N)
    tokens: int                     # tokens run through the model (padding excluded)
    metrics: dict[str, float]       # metric sums
    bad_micro_batch: Optional[int] = None   # the first micro-batch with a non-finite loss


def model_dtype(model: nn.Module) -> torch.dtype:
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def has_nf4(model: nn.Module) -> bool:
    return any(isinstance(m, NF4Linear) for m in model.modules())


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Trainer:
    """Train `model` on `train_dataset` (indexable examples) under `cfg`; see module docstring.

    collate_fn: list of examples -> batch dict (input_ids, labels [, position_ids,
    document_ids, attention_mask], LongTensors [B, T]); default data.pad_collate (right-pad
    with pad_id, labels -100, attention_mask).
    objective: what a step minimises (train.objective; default the language-model loss).
    lora_config: the adapters the two-phase mode injects at the switch (a lora.LoRAConfig; train.phases).
    tokenizer: written with the final model/adapter, so each output folder is complete.
    say: where the loop's messages go (resume, progress notes); default stderr on rank 0.
    on_micro_batch: optional callable(step, micro_batch) run before each micro-batch (tests
    use it to inject crashes).
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, train_dataset: Sequence, eval_dataset: Optional[Sequence] = None,
                 collate_fn: Optional[Callable] = None, *, objective: Optional[Objective] = None,
                 lora_config: Optional["lora.LoRAConfig"] = None, tokenizer=None,
                 say: Optional[Callable[[str], None]] = None):
        if not isinstance(cfg, TrainConfig):
            raise TypeError(f"cfg must be a train.TrainConfig, got {type(cfg).__name__}")
        cfg.validate()
        self.model, self.cfg = model, cfg
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        if eval_dataset is not None and len(eval_dataset) == 0:
            raise ValueError("eval_dataset is empty: pass None to train without evaluation")
        self.objective = objective or LanguageModelLoss()
        self.lora_config, self.tokenizer = lora_config, tokenizer
        self.out = Path(cfg.out_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.device = model_device(model)
        self.pad_id = self._pad_id()
        self.collate = collate_fn or self.default_collate
        self.dist = DataParallel(cfg.parallel)   # world_size 1 without a process group
        self.dist.check_supported(cfg.mode, has_nf4(model))
        self.say = say or (_stderr if self.dist.is_main else (lambda message: None))
        self.sampler = MicroBatchSampler(train_dataset, cfg.batch_size, seed=cfg.seed, shuffle=cfg.shuffle,
                                         rank=self.dist.rank, world_size=self.dist.world_size)
        self.total_steps = self._total_steps()
        self.warmup = resolve_warmup(self.total_steps, cfg.warmup_steps, cfg.warmup_ratio)
        self.plan = FineTuningPlan.of(cfg.mode, cfg.full_fraction, lora_config, self.total_steps)
        self.autocast_dtype = self._precision()
        self.scaler = DynamicLossScaler(enabled=cfg.dtype == "fp16")
        self.on_micro_batch: Optional[Callable[[int, int], None]] = None
        # A source of each step's micro-batches instead of the sampler (e.g. GRPO's generations);
        # see `BatchSource`. Set it before fit().
        self.batch_source: Optional[BatchSource] = None
        self.metrics = MetricsLog(self.out / "metrics.jsonl",
                                  tensorboard_dir=self.out / "runs" if cfg.report_to == "tensorboard" else None)

        self.step = 0              # optimizer steps taken (a checkpoint step-N holds N)
        self.micro_step = 0        # micro-batches consumed
        self.bad_in_a_row = 0
        self.skipped_steps = 0
        self.evals: list[dict[str, Any]] = []
        self.resumed_from: Optional[str] = None
        self._checked_phase: Optional[str] = None
        self.forward_model: nn.Module = model   # what forward/backward run through (DDP wrapper, ...)
        self._setup_phase(self.plan.phase_at(0))
        self.device = model_device(model)      # FSDP2 may have moved the shards to the mesh's device
        if hasattr(model, "enable_gradient_checkpointing"):
            model.enable_gradient_checkpointing(bool(cfg.grad_checkpointing))
        elif cfg.grad_checkpointing:
            raise ValueError(f"{type(model).__name__} has no `enable_gradient_checkpointing`; set grad_checkpointing=False")
        self.optimizer = self._build_optimizer()
        if self.dist.rank > 0:   # the replicas are equal now; the other ranks draw their own dropout masks
            torch.manual_seed(rank_seed(cfg.seed, self.dist.rank))   # (rank 0 keeps a single process's stream)

    # ------------------------------------------------------------------ setup
    def default_collate(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        """data.pad_collate after making every field a LongTensor; no labels = all supervised (CPT)."""
        items = []
        for ex in examples:
            if "input_ids" not in ex:
                raise KeyError(f"training example has no 'input_ids' (keys: {sorted(ex)})")
            item = {k: torch.as_tensor(v, dtype=torch.long) for k, v in ex.items()}
            item.setdefault("labels", item["input_ids"].clone())
            items.append(item)
        return pad_collate(items, pad_id=self.pad_id)

    def _pad_id(self) -> int:
        if self.cfg.pad_id is not None:
            return self.cfg.pad_id
        vocab = getattr(getattr(self.model, "config", None), "vocab_size", None)
        return ENDOFTEXT_ID if vocab is None or ENDOFTEXT_ID < vocab else 0

    def _total_steps(self) -> int:
        cfg = self.cfg
        if cfg.max_steps is not None:
            return cfg.max_steps
        epochs = cfg.epochs if cfg.epochs is not None else 1
        global_batch = cfg.batch_size * cfg.grad_accum * self.dist.world_size
        return max(1, math.ceil(epochs * self.sampler.samples_per_epoch / global_batch))

    def _precision(self) -> Optional[torch.dtype]:
        """The autocast dtype, or None to run the model in its own dtype."""
        want, have = dtype_from_name(self.cfg.dtype), model_dtype(self.model)
        if self.cfg.dtype == "fp16":
            warnings.warn("dtype='fp16': Qwen was trained in bf16 and its activations can overflow fp16; "
                          "using dynamic loss scaling. Prefer bf16 where the hardware has it.", stacklevel=3)
        if have == want:
            return None
        if have == torch.float32:
            return want
        raise ValueError(f"TrainConfig.dtype={self.cfg.dtype!r} but the model's parameters are {have}: load the model "
                         f"in float32 (autocast to {self.cfg.dtype}) or in {want}")

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @property
    def switch_step(self) -> Optional[int]:
        """The step after which the LoRA phase begins (two-phase mode), else None (train.phases)."""
        return self.plan.switch_step

    def _setup_phase(self, phase: str) -> None:
        """Enter `phase`: the plan makes its parameters trainable (injecting the adapters at the
        switch), then the trainable set is fixed for the distributed wrapper."""
        self.plan.enter(self.model, phase)
        self.phase = phase
        self.forward_model = self.dist.prepare(self.model)   # the trainable set is fixed now

    def _build_optimizer(self) -> AdamW:
        return AdamW(param_groups(self.model, self.cfg.weight_decay), lr=self.cfg.lr,
                     betas=self.cfg.betas, eps=self.cfg.eps, weight_decay=self.cfg.weight_decay)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def lr_at(self, step: int) -> float:
        return learning_rate(step, schedule=self.cfg.lr_scheduler, warmup=self.warmup, total=self.total_steps,
                             peak_lr=self.cfg.lr, min_lr=self.cfg.min_lr)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        """Train to `total_steps`; returns the run summary (on every rank). Raises `Interrupted`
        after saving a checkpoint when SIGINT/SIGTERM arrives."""
        self.out.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main:   # what a crash may have left: staged or half-deleted folders
            recover_all(self.out)
            ckpt.recover_checkpoints(self.ckpt_root)
        self.dist.barrier()
        if self.cfg.resume:
            found = ckpt.newest_checkpoint(self.ckpt_root)
            if found is None:
                self.say(f"resume: no complete checkpoint in {self.ckpt_root}; starting from step 0")
            else:
                self.load_checkpoint(found)
                self.say(f"resume: continuing from {found} (step {self.step} of {self.total_steps})")
        elif self.cfg.warm_start:
            self.warm_start(self.cfg.warm_start)
        if self.dist.is_main:
            self.metrics.trim(self.step if self.resumed_from else None)
            ckpt.write_json(self.out / "train_config.json", self.cfg.to_json())

        last_loss: Optional[float] = None
        progress = Progress(self.total_steps, self.step, self.cfg.progress if self.dist.is_main else "off",
                            self.cfg.print_every)
        try:
            with StopSignals() as stop:
                while self.step < self.total_steps and stop.requested is None:
                    if self.plan.switch_due(self.step, self.phase):
                        self._setup_phase(self.plan.phase_at(self.step))
                        self.optimizer = self._build_optimizer()   # fresh state for the new trainable set
                    stats = self.train_step()
                    if stats["loss"] is not None:
                        last_loss = stats["loss"]
                    if self.step % self.cfg.log_every == 0 or self.step == self.total_steps:
                        self._append_metrics(stats)
                    progress.update(stats)
                    val = None
                    if self.eval_dataset is not None and self.cfg.eval_every and self.step % self.cfg.eval_every == 0:
                        val = self._evaluate_and_log()
                    if self.cfg.save_every and self.step % self.cfg.save_every == 0:
                        self.save_checkpoint(val_loss=val)
                    if self.dist.enabled and self.dist.any(stop.requested is not None) and stop.requested is None:
                        stop.requested = "SIGTERM"   # a signal on another rank: every rank stops after this step
                if stop.requested is not None:
                    path = self.save_checkpoint(val_loss=self._val_at(self.step))
                    raise Interrupted(stop.requested, self.step, self.total_steps, path)
        except Interrupted as e:
            if e.checkpoint is None:   # a second signal: stopped mid-step, the newest checkpoint stands
                found = ckpt.newest_checkpoint(self.ckpt_root)
                e = Interrupted(e.signal, self.step, self.total_steps, found)
            raise e from None
        finally:
            progress.close()
            self.metrics.close()
        if self.eval_dataset is not None and (not self.evals or self.evals[-1]["step"] != self.step):
            self._evaluate_and_log()
        # Re-saving the step the loop may just have saved is harmless (atomic replace) and
        # records the final validation loss with it.
        paths = {"checkpoint": str(self.save_checkpoint(val_loss=self._val_at(self.step)))}
        if self.cfg.save_final:
            paths.update(self.save_final())
        return {
            "steps": self.step,
            "total_steps": self.total_steps,
            "final_loss": last_loss,
            "evals": self.evals,
            "final_eval": self.evals[-1] if self.evals else None,
            "paths": {**paths, "metrics": str(self.metrics.path)},
            "resumed_from": self.resumed_from,
            "skipped_steps": self.skipped_steps,
        }

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over grad_accum micro-batches; returns its stats (loss None if skipped)."""
        cfg, model = self.cfg, self.model
        step = self.step + 1                       # 1-based, as in metrics and checkpoint names
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.batch_source is not None:
            batches = self.batch_source.batches(step)
        else:
            batches = [self.collate([self.train_dataset[i] for i in self.sampler.next_batch()])
                       for _ in range(cfg.grad_accum)]
        self.micro_step += len(batches)
        model.train()
        self.optimizer.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        result = self.accumulate(batches, step)
        if result.bad_micro_batch is not None:
            return self._bad_step(step, result.bad_micro_batch, "loss", lr)

        params = self.trainable_parameters()
        finite = self.scaler.unscale_(params)
        if self.dist.fsdp:   # each rank checked its own shards of the gradients only
            finite = not self.dist.any(not finite)
        if not finite and self.scaler.enabled:       # fp16 overflow: expected now and then
            self.scaler.update(False)
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.skipped_steps += 1
            return self._stats(step, None, lr, float("inf"), result, t0, overflow=True)
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True))
        if not finite or not math.isfinite(grad_norm):
            return self._bad_step(step, -1, "gradient", lr)

        first_update = self._checked_phase != self.phase   # first update of this phase in this process
        if first_update and self.batch_source is not None and not self.batch_source.gradient_expected():
            first_update = False   # e.g. GRPO with every advantage 0: a zero gradient is right; check a later step
        if first_update:
            check_gradients_present(model, step)
            before = lora_b_snapshot(model)
        self.optimizer.step()
        self.scaler.update(True)
        if first_update and lr > 0:   # a warm-up's first update is at lr 0 (HF's schedule): check the next
            check_lora_b_moved(model, before, step)
            self._checked_phase = self.phase
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.bad_in_a_row = 0
        stats = self._stats(step, result.loss_sum / result.count, lr, grad_norm, result, t0)
        if self.batch_source is not None:
            stats.update(self.batch_source.step_metrics())
        return stats

    def accumulate(self, batches: Sequence[dict], step: int) -> StepResult:
        """Forward+backward every micro-batch, leaving in .grad the gradient of
        (sum of the objective over all batches) / (its units in all batches) x loss scale.

        With several ranks, "all batches" means those of every rank: the count, loss and metrics
        are summed over the ranks, and a rank keeps running the backwards after a non-finite
        loss so that the gradient collectives stay in step (the step is then dropped on every
        rank). `bad_micro_batch` names the first micro-batch whose loss was not finite (its
        backward is not run on one process).
        """
        model, dist, objective = self.forward_model, self.dist, self.objective
        count = int(dist.all_reduce([sum(objective.count(b) for b in batches)])[0])
        if count == 0:
            raise ValueError(f"step {step}: the {len(batches)} micro-batch(es) hold no {objective.unit} (every "
                             "label is -100?): check the data's label masking")
        # DDP and FSDP average the ranks' gradients: the factor world_size makes that average
        # the sum of every rank's share of the global mean.
        factor = self.scaler.scale * dist.world_size / count
        loss_sum, tokens, first_bad = 0.0, 0, len(batches)
        metrics: dict[str, float] = {}
        for m, batch in enumerate(batches):
            if self.on_micro_batch is not None:
                self.on_micro_batch(step, m)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with dist.sync_gradients(model, last=m == len(batches) - 1):
                with self._autocast():
                    ls, extra = objective(model, batch)
                if not torch.isfinite(ls.detach()):
                    if not dist.enabled:
                        return StepResult(0.0, count, 0, {}, bad_micro_batch=m)
                    first_bad = min(first_bad, m)
                if not ls.requires_grad:
                    first = next((n for n, p in self.model.named_parameters() if p.requires_grad), None)
                    raise NothingTrainsError(
                        f"step {step}, micro-batch {m + 1}: the loss depends on no trainable parameter, so every one "
                        f"received no gradient, first {first!r} (adapters disabled? base and adapters frozen?)")
                (ls * factor).backward()
            loss_sum += float(ls.detach())
            for k, v in extra.items():
                metrics[k] = metrics.get(k, 0.0) + float(v)
            tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        if dist.enabled:
            names = sorted(metrics)
            reduced = dist.all_reduce([loss_sum, tokens] + [metrics[k] for k in names])
            loss_sum, tokens = reduced[0], reduced[1]
            metrics = dict(zip(names, reduced[2:]))
            first_bad = int(dist.all_reduce([first_bad], op="min")[0])
            if first_bad < len(batches):
                return StepResult(loss_sum, count, int(tokens), metrics, bad_micro_batch=first_bad)
        return StepResult(loss_sum, count, int(tokens), metrics)

    def _bad_step(self, step: int, micro: int, what: str, lr: float) -> dict[str, Any]:
        """Non-finite loss/gradient: raise (nan_policy="stop") or skip and count ("skip")."""
        parameter = first_nonfinite(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        if self.cfg.nan_policy == "stop":
            raise NonFiniteError(step, micro, self.cfg.grad_accum, what, parameter)
        self.bad_in_a_row += 1
        self.skipped_steps += 1
        if self.bad_in_a_row >= self.cfg.max_bad_steps:
            raise NonFiniteError(step, micro, self.cfg.grad_accum, what, parameter, skipped_in_a_row=self.bad_in_a_row)
        warnings.warn(f"{NonFiniteError(step, micro, self.cfg.grad_accum, what, parameter)}: step skipped "
                      f"({self.bad_in_a_row} in a row, max_bad_steps={self.cfg.max_bad_steps})", stacklevel=2)
        self.step += 1
        return self._stats(step, None, lr, float("nan"), StepResult(0.0, 0, 0, {}), time.perf_counter(), skipped=True)

    def _stats(self, step, loss, lr, grad_norm, result: StepResult, t0, **extra) -> dict[str, Any]:
        elapsed = max(time.perf_counter() - t0, 1e-9)
        means = self._metric_means(result.metrics, result.count) if result.count else {}
        return {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, self.objective.count_name: result.count,
                "tokens": result.tokens, "tokens_per_s": result.tokens / elapsed, "epoch": self.sampler.epoch,
                "micro_step": self.micro_step, "phase": self.phase, **means, **peak_memory(self.device), **extra}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The objective's mean over eval_dataset (for the language-model loss: the token-weighted
        loss), perplexity exp(loss), the unit count and the metric means.

        Distributed: a collective (every rank calls it), each result is over the whole eval_dataset."""
        if self.eval_dataset is None:
            raise ValueError("evaluate(): this Trainer has no eval_dataset")
        was_training = self.model.training
        self.model.eval()
        size = self.cfg.eval_batch_size or self.cfg.batch_size
        starts = range(0, len(self.eval_dataset), size)
        # DDP: each rank evaluates a share of the batches and the sums are added up. FSDP2's
        # forward is itself a collective, so there every rank runs every batch.
        share = self.dist.enabled and not self.dist.fsdp
        if share:
            starts = starts[self.dist.rank :: self.dist.world_size]
        loss_sum, count, metrics = 0.0, 0, {}
        try:
            for start in starts:
                examples = [self.eval_dataset[i] for i in range(start, min(start + size, len(self.eval_dataset)))]
                batch = {k: v.to(self.device) for k, v in self.collate(examples).items()}
                with self._autocast():
                    ls, extra = self.objective(self.model, batch)
                loss_sum += float(ls)
                count += self.objective.count(batch)
                for k, v in extra.items():
                    metrics[k] = metrics.get(k, 0.0) + float(v)
        finally:
            self.model.train(was_training)
        if share:
            names = sorted(metrics)
            reduced = self.dist.all_reduce([loss_sum, count] + [metrics[k] for k in names])
            loss_sum, count, metrics = reduced[0], int(reduced[1]), dict(zip(names, reduced[2:]))
        if count == 0:
            raise ValueError(f"evaluate(): the eval_dataset holds no {self.objective.unit}")
        loss = loss_sum / count
        counted = "tokens" if isinstance(self.objective, LanguageModelLoss) else self.objective.count_name
        return {"loss": loss, "ppl": perplexity_of(loss), counted: count, **self._metric_means(metrics, count)}

    def _metric_means(self, sums: dict[str, float], count: int) -> dict[str, float]:
        """The logged values of metric sums over `count` units: each sum / count, or the
        objective's own `metric_means(sums, count)` where it has one (KTO: means over each label)."""
        own = getattr(self.objective, "metric_means", None)
        return own(sums, count) if own is not None else {k: v / count for k, v in sums.items()}

    def _evaluate_and_log(self) -> float:
        result = self.evaluate()
        row = {"step": self.step, **{f"val_{k}": v for k, v in result.items()}}
        self.evals.append(row)
        self._append_metrics(row)
        return result["loss"]

    def _val_at(self, step: int) -> Optional[float]:
        return next((e["val_loss"] for e in reversed(self.evals) if e["step"] == step), None)

    def _append_metrics(self, row: dict[str, Any]) -> None:
        if self.dist.is_main:
            self.metrics.append(row)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, val_loss: Optional[float] = None) -> Path:
        """Write out_dir/checkpoints/step-N (train.checkpoint.state), then keep the last K and the best.

        Distributed: every rank calls it (FSDP shards and the ranks' RNG states are gathered
        onto rank 0), rank 0 writes the same files as a single process would, the others wait.
        """
        final = self.ckpt_root / f"step-{self.step}"
        opt_tensors, opt_meta = ckpt.optimizer_to_files(self.optimizer)
        opt_tensors = self.dist.full_tensors(opt_tensors)
        rng_states = self._gather_rng_states()
        extra = self._gather_source_states()
        with self.dist.full_parameters(self.model, trainable_only=True):
            if self.dist.is_main:
                named = dict(self.model.named_parameters())
                frozen = {n: p for n, p in named.items() if not p.requires_grad}
                ckpt.write_checkpoint(
                    final,
                    trainable={n: p for n, p in named.items() if p.requires_grad},
                    frozen=frozen if self.plan.saves_base(self.phase) else None,
                    adapter_model=self.model if lora.has_adapters(self.model) else None,
                    optimizer=(opt_tensors, opt_meta), rng_states=rng_states, extra=extra,
                    state={
                        "step": self.step, "micro_step": self.micro_step, "total_steps": self.total_steps,
                        "warmup": self.warmup, "next_lr": self.lr_at(min(self.step, self.total_steps)),
                        "phase": self.phase, "sampler": self.sampler.state_dict(), "scaler": self.scaler.state_dict(),
                        "bad_in_a_row": self.bad_in_a_row, "skipped_steps": self.skipped_steps, "val_loss": val_loss,
                        "evals": self.evals, "config": self.cfg.to_json(), "time": time.time(),
                        "world_size": self.dist.world_size,
                    })
                ckpt.prune_checkpoints(self.ckpt_root, self.cfg.keep_last, best=ckpt.best_checkpoint(self.ckpt_root))
        self.dist.barrier()
        return final

    def _gather_rng_states(self) -> list[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        """[(tensors, meta)] of capture_rng_state() for every rank, on rank 0 ([] elsewhere)."""
        import json

        from fileio.safetensors_file import tensors_from_bytes, tensors_to_bytes

        tensors, meta = capture_rng_state()
        if not self.dist.enabled:
            return [(tensors, meta)]
        blobs = self.dist.gather_bytes(tensors_to_bytes(tensors))
        metas = self.dist.gather_bytes(json.dumps(meta).encode("utf-8"))
        return [(tensors_from_bytes(b), json.loads(m)) for b, m in zip(blobs, metas)]

    def _gather_source_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """{source-rank{r}.safetensors: the batch source's state on rank r}, on rank 0 ({} elsewhere)."""
        if self.batch_source is None:
            return {}
        from fileio.safetensors_file import tensors_from_bytes, tensors_to_bytes

        blobs = self.dist.gather_bytes(tensors_to_bytes(self.batch_source.state_tensors()))
        return {f"source-rank{r}.safetensors": tensors_from_bytes(b) for r, b in enumerate(blobs)}

    def load_checkpoint(self, path: os.PathLike) -> None:
        """Restore the whole run state from a checkpoint directory (resume). Anything missing,
        damaged or not of this run is a CheckpointError naming the file and the key."""
        found = ckpt.Checkpoint(Path(path))
        state, path = found.state, found.path
        saved = state["config"]
        for key in RESUME_FIXED:
            now = self.cfg.to_json()[key]
            if key in saved and saved[key] != now:
                raise CheckpointError(f"{path}: written with {key}={saved[key]!r}, this run has {key}={now!r}; "
                                      "resume needs the same value (or start a new out_dir / use warm_start)")
        self._check_global_batch(path, {**saved, "world_size": state.get("world_size", 1)})
        if state["total_steps"] != self.total_steps:
            raise CheckpointError(f"{path}: the run had {state['total_steps']} total steps, this one {self.total_steps}: "
                                  "the schedule would change (same max_steps/epochs and dataset needed)")
        if state["phase"] != self.phase:
            self._setup_phase(state["phase"])
        if found.has("model.safetensors"):
            ckpt.copy_into(self.model, found.tensors("model.safetensors"), path / "model.safetensors", trainable=False)
        ckpt.copy_into(self.model, found.tensors("trainable.safetensors"), path / "trainable.safetensors", trainable=True)
        self.optimizer = self._build_optimizer()
        self.optimizer.load_state_dict(found.optimizer_state(self.optimizer))
        self.dist.shard_optimizer_state(self.optimizer)
        where = path / ckpt.STATE_FILE
        try:
            self.sampler.load_state_dict(state["sampler"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: key 'sampler': {e}") from None
        try:
            self.scaler.load_state_dict(state["scaler"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: key 'scaler': {e}") from None
        rng = found.rng(self.dist.rank)
        if rng is not None:
            try:
                restore_rng_state(*rng)
            except (KeyError, TypeError, ValueError, RuntimeError) as e:
                raise CheckpointError(f"{path / ckpt.rng_name(self.dist.rank)}.*: bad RNG state ({e})") from None
        else:  # a rank the checkpointed run did not have (resumed on more processes)
            torch.manual_seed(rank_seed(self.cfg.seed, self.dist.rank, found.step))
        if self.batch_source is not None:
            name = f"source-rank{self.dist.rank}.safetensors"
            self.batch_source.load_state_tensors(found.tensors(name) if found.has(name) else {}, found.step)
        self.step, self.micro_step = found.step, int(state["micro_step"])
        self.bad_in_a_row, self.skipped_steps = int(state["bad_in_a_row"]), int(state["skipped_steps"])
        self.evals = list(state.get("evals", []))
        self.resumed_from = str(path)

    def _check_global_batch(self, path: Path, then: dict[str, Any]) -> None:
        """The split of the global batch may change between runs (another world size), not its size."""
        now = {**self.cfg.to_json(), "world_size": self.dist.world_size}
        if any(then.get(k) is None for k in BATCH_SPLIT):
            return
        size_then, size_now = math.prod(then[k] for k in BATCH_SPLIT), math.prod(now[k] for k in BATCH_SPLIT)
        if size_then != size_now:
            key = next(k for k in BATCH_SPLIT if then[k] != now[k])
            raise CheckpointError(f"{path}: written with {key}={then[key]!r}, this run has {key}={now[key]!r}: the "
                                  f"global batch (batch_size x grad_accum x world_size) was {size_then}, now {size_now}; "
                                  "resume needs the same global batch (or start a new out_dir / use warm_start)")

    def warm_start(self, path: os.PathLike) -> None:
        """Load weights only from a checkpoint (trainable.safetensors) or a PEFT adapter directory."""
        path = Path(path)
        if (path / "trainable.safetensors").is_file():
            found = ckpt.Checkpoint(path)
            if found.has("model.safetensors"):
                ckpt.copy_into(self.model, found.tensors("model.safetensors"), path / "model.safetensors", trainable=False)
            ckpt.copy_into(self.model, found.tensors("trainable.safetensors"), path / "trainable.safetensors", trainable=True)
        elif (path / "adapter_config.json").is_file():
            lora.load(self.model, path)
        else:
            raise CheckpointError(f"warm_start={str(path)!r}: expected a checkpoint directory (trainable.safetensors) "
                                  "or a PEFT adapter directory (adapter_config.json)")
        self.optimizer = self._build_optimizer()

    def save_final(self) -> dict[str, str]:
        """The run's final outputs (train.export); rank 0 writes (FSDP2 shards gathered onto its
        CPU first), the others wait."""
        paths: dict[str, str] = {}
        with self.dist.full_parameters(self.model, trainable_only=not self.plan.trains_base):
            if self.dist.is_main:
                paths = save_final(self.model, self.out, self.cfg.mode, tokenizer=self.tokenizer)
        self.dist.barrier()
        return paths


class BatchSource:
    """What Trainer.batch_source is: each step's micro-batches made by the caller (GRPO generates
    them) instead of drawn by the sampler, with a state that checkpoints carry.

    batches(step) -> grad_accum collated micro-batches of this process for 1-based `step`;
    step_metrics() -> {name: float} added to the step's metrics row; state_tensors() -> tensors
    saved with a checkpoint (this rank's); load_state_tensors(tensors, step) restores them on
    resume ({} when the checkpoint holds none); gradient_expected() -> False when this step's
    batches rightly give a zero gradient (the first-update checks then wait for a later step).
    """

    def batches(self, step: int) -> list[dict]: ...

    def step_metrics(self) -> dict[str, float]: ...

    def state_tensors(self) -> dict[str, torch.Tensor]: ...

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], step: int) -> None: ...

    def gradient_expected(self) -> bool: ...


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak memory so far: CUDA allocator peak on a GPU, else the process's max RSS (bytes)."""
    if device.type == "cuda":
        return {"peak_mem": torch.cuda.max_memory_allocated(device), "peak_mem_kind": "cuda_allocated"}
    return {"peak_mem": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak_mem_kind": "cpu_max_rss"}
