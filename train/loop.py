"""The training loop: one class, read top to bottom in `fit`.

    trainer = Trainer(model, TrainConfig(out_dir="out", max_steps=100, grad_accum=8), train_ds, eval_ds)
    summary = trainer.fit()       # {"steps", "final_loss", "evals", "final_eval", "paths", ...}
    trainer.evaluate()            # {"loss", "ppl", "tokens"} over eval_ds

One optimizer step:
  1. draw all `grad_accum` micro-batches of the step and count their supervised tokens N
     (labels[:, 1:] != -100, the model shifts inside);
  2. for each micro-batch: (loss_sum, n) = model(..., reduction="sum"); backward(loss_sum / N)
     — so the gradient is that of the mean over every supervised token of the whole step,
     whatever the split into micro-batches and however long each sequence is;
  3. (fp16) unscale, skip on overflow; clip to max_grad_norm; non-finite guard;
  4. AdamW at lr = cosine_warmup(step); first update of a phase: every trainable parameter
     had a finite gradient and every LoRA B moved.
Every `save_every` steps, on SIGINT/SIGTERM, and at the end, the whole state goes to
out_dir/checkpoints/step-N (see `save_checkpoint`); resume=True continues from the newest.

Under torchrun (a torch.distributed process group of W ranks, see train.distributed), each
rank takes its share of every micro-batch of the global batch (batch_size x grad_accum x W),
N in step 1 is summed over the ranks, gradients are averaged by DDP or FSDP2 on the last
micro-batch, and rank 0 alone writes metrics, checkpoints and the final outputs.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import threading
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

import lora
from data import pad_collate
from models.qwen import ENDOFTEXT_ID

from .batches import IGNORE_INDEX, MicroBatchSampler
from .checkpoint import (
    STATE_FILE,
    CheckpointError,
    atomic_directory,
    complete_checkpoints,
    load_tensors,
    newest_checkpoint,
    optimizer_from_files,
    optimizer_to_files,
    prune_checkpoints,
    read_json,
    remove_stale_temporaries,
    save_tensors,
    write_json,
)
from .config import BATCH_SPLIT, RESUME_FIXED, TrainConfig
from .distributed import DataParallel, rank_seed, shard_as
from .guards import (
    NonFiniteError,
    NothingTrainsError,
    check_gradients_present,
    check_lora_b_moved,
    first_nonfinite,
    lora_b_snapshot,
)
from .optim import AdamW, param_groups
from .rng import capture_rng_state, restore_rng_state
from .scaler import DynamicLossScaler
from .schedule import cosine_warmup, resolve_warmup

MODEL_INPUTS = ("position_ids", "document_ids", "attention_mask")
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def supervised_tokens(labels: torch.Tensor) -> int:
    """Targets of next-token prediction in a [B, T] label batch: labels[:, 1:] != -100."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


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
    return any(lora.is_nf4_linear(m) for m in model.modules())


class Trainer:
    """Train `model` on `train_dataset` (indexable examples) under `cfg`; see module docstring.

    collate_fn: list of examples -> batch dict (input_ids, labels [, position_ids,
    document_ids, attention_mask], LongTensors [B, T]); default data.pad_collate (right-pad
    with pad_id, labels -100, attention_mask).
    on_micro_batch: optional callable(step, micro_batch) run before each micro-batch (tests
    use it to inject crashes).
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, train_dataset: Sequence, eval_dataset: Optional[Sequence] = None,
                 collate_fn: Optional[Callable] = None):
        if not isinstance(cfg, TrainConfig):
            raise TypeError(f"cfg must be a train.TrainConfig, got {type(cfg).__name__}")
        cfg.validate()
        self.model, self.cfg = model, cfg
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        if eval_dataset is not None and len(eval_dataset) == 0:
            raise ValueError("eval_dataset is empty: pass None to train without evaluation")
        self.out = Path(cfg.out_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.metrics_path = self.out / "metrics.jsonl"
        self.device = model_device(model)
        self.pad_id = self._pad_id()
        self.collate = collate_fn or self.default_collate
        self.dist = DataParallel(cfg.parallel)   # world_size 1 without a process group
        self.dist.check_supported(cfg.mode, has_nf4(model))
        self.sampler = MicroBatchSampler(train_dataset, cfg.batch_size, seed=cfg.seed, shuffle=cfg.shuffle,
                                         rank=self.dist.rank, world_size=self.dist.world_size)
        self.total_steps = self._total_steps()
        self.warmup = resolve_warmup(self.total_steps, cfg.warmup_steps, cfg.warmup_ratio)
        self.switch_step = round(cfg.full_fraction * self.total_steps) if cfg.mode == "full-then-lora" else None
        self.autocast_dtype = self._precision()
        self.scaler = DynamicLossScaler(enabled=cfg.dtype == "fp16")
        self.on_micro_batch: Optional[Callable[[int, int], None]] = None

        self.step = 0              # optimizer steps taken (a checkpoint step-N holds N)
        self.micro_step = 0        # micro-batches consumed
        self.bad_in_a_row = 0
        self.skipped_steps = 0
        self.evals: list[dict[str, Any]] = []
        self.resumed_from: Optional[str] = None
        self._stop_signal: Optional[str] = None
        self._checked_phase: Optional[str] = None
        self.phase = "full" if cfg.mode == "full" or (cfg.mode == "full-then-lora" and self.switch_step > 0) else "lora"
        self.forward_model: nn.Module = model   # what forward/backward run through (DDP wrapper, ...)
        self._setup_phase(self.phase)
        self.device = model_device(model)      # FSDP2 may have moved the shards to the mesh's device
        if hasattr(model, "gradient_checkpointing"):
            model.gradient_checkpointing = bool(cfg.grad_checkpointing)
        elif cfg.grad_checkpointing:
            raise ValueError(f"{type(model).__name__} has no `gradient_checkpointing` switch; set grad_checkpointing=False")
        self.optimizer = self._build_optimizer()
        if self.dist.rank > 0:   # the replicas are equal now; the other ranks draw their own dropout masks
            torch.manual_seed(rank_seed(cfg.seed, self.dist.rank))   # (rank 0 keeps a single process's stream)

    # ------------------------------------------------------------------ setup
    def default_collate(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        """data.pad_collate after making every field a LongTensor; no labels = all supervised (CPT)."""
        items = []
        for i, ex in enumerate(examples):
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
        want, have = TORCH_DTYPES[self.cfg.dtype], model_dtype(self.model)
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

    def _setup_phase(self, phase: str) -> None:
        """Make the right parameters trainable: all of them ("full") or only adapters ("lora")."""
        cfg, model = self.cfg, self.model
        if phase == "full":
            if lora.has_adapters(model):
                raise ValueError("mode='full' (or the full phase of 'full-then-lora') but the model already holds LoRA "
                                 "adapters: merge them first (lora.merge) or use mode='lora'")
            if has_nf4(model):
                raise ValueError("full-parameter training of an NF4-quantised model is not possible: the 4-bit weights "
                                 "have no gradient. Use mode='lora' (QLoRA) or load the model unquantised")
            for p in model.parameters():
                p.requires_grad_(p.is_floating_point())
        else:
            if not lora.has_adapters(model):
                lora.inject(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                            targets=cfg.lora_targets)
        self.phase = phase
        self.forward_model = self.dist.prepare(model)   # the trainable set is fixed now

    def _build_optimizer(self) -> AdamW:
        return AdamW(param_groups(self.model, self.cfg.weight_decay), lr=self.cfg.lr,
                     betas=self.cfg.betas, eps=self.cfg.eps, weight_decay=self.cfg.weight_decay)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def lr_at(self, step: int) -> float:
        return cosine_warmup(step, warmup=self.warmup, total=self.total_steps, peak_lr=self.cfg.lr, min_lr=self.cfg.min_lr)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        """Train to `total_steps` (or until SIGINT/SIGTERM); returns the run summary (on every rank)."""
        self.out.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main:
            remove_stale_temporaries(self.ckpt_root)
        self.dist.barrier()
        if self.cfg.resume:
            found = newest_checkpoint(self.ckpt_root)
            if found is not None:
                self.load_checkpoint(found)
        elif self.cfg.warm_start:
            self.warm_start(self.cfg.warm_start)
        self._trim_metrics()
        if self.dist.is_main:
            write_json(self.out / "train_config.json", self.cfg.to_json())

        last_loss: Optional[float] = None
        paths: dict[str, str] = {}
        bar = self._progress_bar()
        with self._signals(), _closing(bar):
            while self.step < self.total_steps and self._stop_signal is None:
                if self.switch_step is not None and self.phase == "full" and self.step >= self.switch_step:
                    self._setup_phase("lora")
                    self.optimizer = self._build_optimizer()   # fresh state for the adapters
                stats = self.train_step()
                self._agree_on_stop()
                if stats["loss"] is not None:
                    last_loss = stats["loss"]
                if self.step % self.cfg.log_every == 0 or self.step == self.total_steps:
                    self._log(stats)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{stats['loss']:.4f}" if stats["loss"] is not None else "skip",
                                    lr=f"{stats['lr']:.2e}")
                val = None
                if self.eval_dataset is not None and self.cfg.eval_every and self.step % self.cfg.eval_every == 0:
                    val = self._evaluate_and_log()
                if self.cfg.save_every and self.step % self.cfg.save_every == 0:
                    paths["checkpoint"] = str(self.save_checkpoint(val_loss=val))
            interrupted = self._stop_signal
            if interrupted is not None:
                paths["checkpoint"] = str(self.save_checkpoint(val_loss=self._val_at(self.step)))
            else:
                if self.eval_dataset is not None and (not self.evals or self.evals[-1]["step"] != self.step):
                    self._evaluate_and_log()
                # Re-saving the step the loop may just have saved is harmless (atomic replace) and
                # records the final validation loss with it.
                paths["checkpoint"] = str(self.save_checkpoint(val_loss=self._val_at(self.step)))
                paths.update(self.save_final())
        return {
            "steps": self.step,
            "total_steps": self.total_steps,
            "final_loss": last_loss,
            "evals": self.evals,
            "final_eval": self.evals[-1] if self.evals else None,
            "paths": {**paths, "metrics": str(self.metrics_path)},
            "interrupted": interrupted,
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
        batches = [self.collate([self.train_dataset[i] for i in self.sampler.next_batch()])
                   for _ in range(cfg.grad_accum)]
        self.micro_step += len(batches)
        model.train()
        self.optimizer.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        result = self.accumulate(batches, step)
        if isinstance(result, int):                  # micro-batch `result` had a non-finite loss
            return self._bad_step(step, result, "loss", lr)
        loss_sum, n_total, tokens = result

        params = self.trainable_parameters()
        finite = self.scaler.unscale_(params)
        if self.dist.fsdp:   # each rank checked its own shards of the gradients only
            finite = not self.dist.any(not finite)
        if not finite and self.scaler.enabled:       # fp16 overflow: expected now and then
            self.scaler.update(False)
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.skipped_steps += 1
            return self._stats(step, None, lr, float("inf"), n_total, tokens, t0, overflow=True)
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True))
        if not finite or not math.isfinite(grad_norm):
            return self._bad_step(step, -1, "gradient", lr)

        if self._checked_phase != self.phase:       # first update of this phase in this process
            check_gradients_present(model, step)
            before = lora_b_snapshot(model)
        self.optimizer.step()
        self.scaler.update(True)
        if self._checked_phase != self.phase:
            if lr > 0:
                check_lora_b_moved(model, before, step)
            self._checked_phase = self.phase
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.bad_in_a_row = 0
        return self._stats(step, loss_sum / n_total, lr, grad_norm, n_total, tokens, t0)

    def accumulate(self, batches: Sequence[dict], step: int):
        """Forward+backward every micro-batch, leaving in .grad the gradient of
        (sum of token losses of all batches) / (supervised tokens of all batches) x loss scale.

        Returns (loss_sum, n_total, tokens), or the index of the first micro-batch whose loss
        was not finite (its backward is not run). With several ranks, "all batches" means those
        of every rank: n_total, loss_sum and tokens are summed over the ranks, and a rank keeps
        running the backwards after a non-finite loss so that the gradient collectives stay in
        step (the step is then dropped on every rank).
        """
        model, dist = self.forward_model, self.dist
        n_local = sum(supervised_tokens(b["labels"]) for b in batches)
        n_total = int(dist.all_reduce([n_local])[0])
        if n_total == 0:
            raise ValueError(f"step {step}: the {len(batches)} micro-batch(es) hold no supervised token "
                             "(every label is -100): check the data's label masking")
        # DDP and FSDP average the ranks' gradients: the factor world_size makes that average
        # the sum of every rank's share of the global token mean.
        factor = self.scaler.scale * dist.world_size / n_total
        loss_sum, tokens, first_bad = 0.0, 0, len(batches)
        for m, batch in enumerate(batches):
            if self.on_micro_batch is not None:
                self.on_micro_batch(step, m)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            extras = {k: batch[k] for k in MODEL_INPUTS if k in batch}
            with dist.sync_gradients(model, last=m == len(batches) - 1):
                with self._autocast():
                    ls, n = model(batch["input_ids"], labels=batch["labels"], reduction="sum", **extras)
                expected = supervised_tokens(batch["labels"])
                if int(n) != expected:
                    raise RuntimeError(f"step {step}, micro-batch {m + 1}: the model counted {int(n)} supervised "
                                       f"tokens, the loop {expected}: the model must shift labels inside and ignore -100")
                if not torch.isfinite(ls.detach()):
                    if not dist.enabled:
                        return m
                    first_bad = min(first_bad, m)
                if not ls.requires_grad:
                    first = next((n for n, p in self.model.named_parameters() if p.requires_grad), None)
                    raise NothingTrainsError(
                        f"step {step}, micro-batch {m + 1}: the loss depends on no trainable parameter, so every one "
                        f"received no gradient, first {first!r} (adapters disabled? base and adapters frozen?)")
                (ls * factor).backward()
            loss_sum += float(ls.detach())
            tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        if dist.enabled:
            loss_sum, tokens = dist.all_reduce([loss_sum, tokens])
            first_bad = int(dist.all_reduce([first_bad], op="min")[0])
            if first_bad < len(batches):
                return first_bad
        return loss_sum, n_total, int(tokens)

    def _agree_on_stop(self) -> None:
        """A SIGINT/SIGTERM on any rank stops every rank after the same step."""
        if self.dist.enabled and self.dist.any(self._stop_signal is not None) and self._stop_signal is None:
            self._stop_signal = "signal on another rank"

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
        return self._stats(step, None, lr, float("nan"), 0, 0, time.perf_counter(), skipped=True)

    def _stats(self, step, loss, lr, grad_norm, n_total, tokens, t0, **extra) -> dict[str, Any]:
        elapsed = max(time.perf_counter() - t0, 1e-9)
        return {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "supervised_tokens": n_total,
                "tokens": tokens, "tokens_per_s": tokens / elapsed, "epoch": self.sampler.epoch,
                "micro_step": self.micro_step, "phase": self.phase, **peak_memory(self.device), **extra}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss (mean over supervised tokens), perplexity exp(loss) and token count.

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
        loss_sum, n_total = 0.0, 0
        try:
            for start in starts:
                examples = [self.eval_dataset[i] for i in range(start, min(start + size, len(self.eval_dataset)))]
                batch = {k: v.to(self.device) for k, v in self.collate(examples).items()}
                extras = {k: batch[k] for k in MODEL_INPUTS if k in batch}
                with self._autocast():
                    ls, n = self.model(batch["input_ids"], labels=batch["labels"], reduction="sum", **extras)
                loss_sum += float(ls)
                n_total += int(n)
        finally:
            self.model.train(was_training)
        if share:
            loss_sum, n_total = self.dist.all_reduce([loss_sum, n_total])
            n_total = int(n_total)
        if n_total == 0:
            raise ValueError("evaluate(): the eval_dataset holds no supervised token")
        loss = loss_sum / n_total
        return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": n_total}

    def _evaluate_and_log(self) -> float:
        result = self.evaluate()
        row = {"step": self.step, "val_loss": result["loss"], "val_ppl": result["ppl"], "val_tokens": result["tokens"]}
        self.evals.append(row)
        self._append_metrics(row)
        return result["loss"]

    def _val_at(self, step: int) -> Optional[float]:
        return next((e["val_loss"] for e in reversed(self.evals) if e["step"] == step), None)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, val_loss: Optional[float] = None) -> Path:
        """Write out_dir/checkpoints/step-N atomically, then keep the last K and the best.

        Files: trainable.safetensors (every trainable parameter by name: the adapter, or the
        full model), model.safetensors (full-then-lora after the switch: the updated base),
        adapter/ (PEFT format, when the model has adapters), optimizer.safetensors +
        optimizer.json, rng.safetensors + rng.json (rng-rank{r}.* for the other ranks of a
        distributed run), state.json (steps, schedule, sampler, loss scaler, guards, config,
        world size; written last).

        Distributed: every rank calls it (FSDP shards and the ranks' RNG states are gathered
        onto rank 0), rank 0 writes the same files as a single process would, the others wait.
        """
        final = self.ckpt_root / f"step-{self.step}"
        opt_tensors, opt_meta = optimizer_to_files(self.optimizer)
        opt_tensors = self.dist.full_tensors(opt_tensors)
        rng_states = self._gather_rng_states()
        with self.dist.full_parameters(self.model, trainable_only=True):
            if self.dist.is_main:
                with atomic_directory(final) as tmp:
                    trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
                    save_tensors(tmp / "trainable.safetensors", trainable)
                    if self.cfg.mode == "full-then-lora" and self.phase == "lora":
                        base = {n: p for n, p in self.model.named_parameters() if not p.requires_grad}
                        save_tensors(tmp / "model.safetensors", base)
                    if lora.has_adapters(self.model):
                        lora.save(self.model, tmp / "adapter")
                    save_tensors(tmp / "optimizer.safetensors", opt_tensors)
                    write_json(tmp / "optimizer.json", opt_meta)
                    for r, (rng_tensors, rng_meta) in enumerate(rng_states):
                        save_tensors(tmp / f"{_rng_name(r)}.safetensors", rng_tensors)
                        write_json(tmp / f"{_rng_name(r)}.json", rng_meta)
                    write_json(tmp / STATE_FILE, {
                        "step": self.step, "micro_step": self.micro_step, "total_steps": self.total_steps,
                        "warmup": self.warmup, "next_lr": self.lr_at(min(self.step, self.total_steps)),
                        "phase": self.phase, "sampler": self.sampler.state_dict(), "scaler": self.scaler.state_dict(),
                        "bad_in_a_row": self.bad_in_a_row, "skipped_steps": self.skipped_steps, "val_loss": val_loss,
                        "evals": self.evals, "config": self.cfg.to_json(), "time": time.time(),
                        "world_size": self.dist.world_size,
                    })
                prune_checkpoints(self.ckpt_root, self.cfg.keep_last, best=best_checkpoint(self.ckpt_root))
        self.dist.barrier()
        return final

    def _gather_rng_states(self) -> list[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        """[(tensors, meta)] of capture_rng_state() for every rank, on rank 0 ([] elsewhere)."""
        tensors, meta = capture_rng_state()
        if not self.dist.enabled:
            return [(tensors, meta)]
        blobs = self.dist.gather_bytes(safetensors_bytes({k: v.contiguous() for k, v in tensors.items()}))
        metas = self.dist.gather_bytes(json.dumps(meta).encode("utf-8"))
        return [(safetensors_tensors(b), json.loads(m)) for b, m in zip(blobs, metas)]

    def load_checkpoint(self, path: os.PathLike) -> None:
        """Restore the whole run state from a checkpoint directory (resume)."""
        path = Path(path)
        state = read_json(path / STATE_FILE)
        saved = state.get("config", {})
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
        if (path / "model.safetensors").is_file():
            _copy_named(self.model, load_tensors(path / "model.safetensors"), path / "model.safetensors", trainable=False)
        _copy_named(self.model, load_tensors(path / "trainable.safetensors"), path / "trainable.safetensors", trainable=True)
        self.optimizer = self._build_optimizer()
        opt_meta = read_json(path / "optimizer.json")
        names_now = [g["names"] for g in self.optimizer.param_groups]
        names_then = [g.get("names") for g in opt_meta["param_groups"]]
        if names_now != names_then:
            raise CheckpointError(f"{path / 'optimizer.json'}: its parameter groups do not match the model's trainable "
                                  "parameters (different LoRA targets/rank or mode?)")
        self.optimizer.load_state_dict(optimizer_from_files(load_tensors(path / "optimizer.safetensors"), opt_meta))
        self.dist.shard_optimizer_state(self.optimizer)
        self.sampler.load_state_dict(state["sampler"])
        self.scaler.load_state_dict(state["scaler"])
        rng = path / _rng_name(self.dist.rank)
        if self.dist.rank == 0 or rng.with_suffix(".safetensors").is_file():
            restore_rng_state(load_tensors(rng.with_suffix(".safetensors")), read_json(rng.with_suffix(".json")))
        else:  # a rank the checkpointed run did not have (resumed on more processes)
            torch.manual_seed(rank_seed(self.cfg.seed, self.dist.rank, int(state["step"])))
        self.step, self.micro_step = int(state["step"]), int(state["micro_step"])
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
            if (path / "model.safetensors").is_file():
                _copy_named(self.model, load_tensors(path / "model.safetensors"), path / "model.safetensors", trainable=False)
            _copy_named(self.model, load_tensors(path / "trainable.safetensors"), path / "trainable.safetensors", trainable=True)
        elif (path / "adapter_config.json").is_file():
            lora.load(self.model, path)
        else:
            raise CheckpointError(f"warm_start={str(path)!r}: expected a checkpoint directory (trainable.safetensors) "
                                  "or a PEFT adapter directory (adapter_config.json)")
        self.optimizer = self._build_optimizer()

    def save_final(self) -> dict[str, str]:
        """out_dir/adapter (PEFT) for LoRA; out_dir/model (HF format) after full training.

        Distributed: rank 0 writes (FSDP2 shards gathered onto its CPU first), the others wait.
        """
        paths = {}
        full = self.cfg.mode in ("full", "full-then-lora")
        with self.dist.full_parameters(self.model, trainable_only=not full):
            if lora.has_adapters(self.model):
                paths["adapter"] = str(self.out / "adapter")
                if self.dist.is_main:
                    lora.save(self.model, self.out / "adapter")
            if full:
                paths["model"] = str(self.out / "model")
                if self.dist.is_main:
                    self._save_model(self.out / "model")
        self.dist.barrier()
        return paths

    def _save_model(self, target: Path) -> None:
        from models.qwen import Qwen, save

        if isinstance(self.model, Qwen) and not lora.has_adapters(self.model):
            save(self.model, target)
        else:  # base weights under their model names; adapters (if any) are in adapter/
            target.mkdir(parents=True, exist_ok=True)
            save_tensors(target / "model.safetensors",
                         {n: p for n, p in self.model.named_parameters() if ".lora_" not in n})

    # ------------------------------------------------------------------ logging and signals
    def _log(self, stats: dict[str, Any]) -> None:
        self._append_metrics({k: v for k, v in stats.items()})

    def _append_metrics(self, row: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, allow_nan=True) + "\n")

    def _trim_metrics(self) -> None:
        """Fresh run: empty metrics.jsonl. Resume: drop rows past the restored step."""
        if not self.dist.is_main or not self.metrics_path.exists():
            return
        if self.resumed_from is None:
            self.metrics_path.write_text("")
            return
        keep = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:   # a line cut by the crash
                continue
            if row.get("step", 0) <= self.step:
                keep.append(line)
        self.metrics_path.write_text("".join(line + "\n" for line in keep))

    def _progress_bar(self):
        if not self.cfg.progress or not self.dist.is_main:
            return None
        from tqdm import tqdm

        return tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)

    def _signals(self):
        trainer = self

        class _Handlers:
            def __enter__(self):
                self.old = {}
                if threading.current_thread() is threading.main_thread():
                    for sig in (signal.SIGINT, signal.SIGTERM):
                        self.old[sig] = signal.signal(sig, self.handle)
                return self

            def handle(self, signum, frame):
                # Finish the current step, then save and return: never die mid-update. A second
                # signal means "now": stop at once (the last complete checkpoint stays valid).
                if trainer._stop_signal is not None:
                    raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping without saving")
                trainer._stop_signal = signal.Signals(signum).name

            def __exit__(self, *exc):
                for sig, old in self.old.items():
                    signal.signal(sig, old)
                return False

        return _Handlers()


@contextmanager
def _closing(bar):
    try:
        yield bar
    finally:
        if bar is not None:
            bar.close()


def _copy_named(model: nn.Module, tensors: dict[str, torch.Tensor], file: Path, trainable: bool) -> None:
    """Copy tensors into the model's parameters of that trainability; every one must match."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad == trainable}
    missing = sorted(set(params) - set(tensors))
    extra = sorted(set(tensors) - set(params))
    if missing or extra:
        raise CheckpointError(f"{file}: does not match the model's {'trainable' if trainable else 'frozen'} parameters"
                              + (f"; missing {missing[:3]}" if missing else "") + (f"; unexpected {extra[:3]}" if extra else ""))
    with torch.no_grad():
        for n, p in params.items():
            t = tensors[n]
            if t.shape != p.shape or t.dtype != p.dtype:
                raise CheckpointError(f"{file}: {n!r} is {t.dtype} {tuple(t.shape)}, the model has {p.dtype} {tuple(p.shape)}")
            p.copy_(shard_as(t, p))   # FSDP2: this rank's shard of the full tensor


def _rng_name(rank: int) -> str:
    """Stem of a rank's RNG files in a checkpoint: rng (rank 0, as in a single process), rng-rank{r}."""
    return "rng" if rank == 0 else f"rng-rank{rank}"


def safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(tensors)


def safetensors_tensors(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)


def best_checkpoint(root: os.PathLike) -> Optional[Path]:
    """The complete checkpoint with the lowest recorded val_loss (None if none has one)."""
    best, best_loss = None, math.inf
    for p in complete_checkpoints(root):
        try:
            v = read_json(p / STATE_FILE).get("val_loss")
        except CheckpointError:
            continue
        if v is not None and v < best_loss:
            best, best_loss = p, v
    return best


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak memory so far: CUDA allocator peak on a GPU, else the process's max RSS (bytes)."""
    if device.type == "cuda":
        return {"peak_mem": torch.cuda.max_memory_allocated(device), "peak_mem_kind": "cuda_allocated"}
    return {"peak_mem": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak_mem_kind": "cpu_max_rss"}
