"""GRPO's training step on the Trainer: each step's micro-batches are generated, scored and given
advantages here (a Trainer.batch_source), and GRPOObjective is their loss.

    source = GRPOSource(prompts, reward_functions, settings, tokenizer=tok)
    trainer = Trainer(model, cfg, completion_slots(prompts, G), objective=GRPOObjective(settings))
    source.attach(trainer); trainer.batch_source = source
    trainer.fit()

One generation feeds `num_iterations` (μ) optimizer steps, as TRL's GRPOTrainer with
steps_per_generation = grad_accum: generation k serves steps kμ+1 .. kμ+μ. Its global batch is
batch_size x grad_accum x world completions = P prompts x G (G consecutive completions per
prompt); process r holds completions [r·B·A, (r+1)·B·A), shuffles them (as TRL's _prepare_inputs
shuffles its generation batch, shuffle_sequence_dict, before split_tensor_dict: each process its
own completions, with a permutation seeded by (seed, generation, rank) instead of the global RNG)
and splits them into A micro-batches of B. The shuffle changes what TRL's per-micro-batch
quantities see (bnpo's token normaliser, the metrics' micro-batch means); grpo, dr_grpo and dapo
losses are sums over the whole batch and do not depend on it. completions.jsonl keeps the
generation order.

Prompt order: the prompts of generation k are positions kP .. kP+P-1 of a stream of seeded
permutations of the prompt set (one per epoch), so it depends on the seed and k only. Sampling:
completion c of generation k draws its tokens from its own torch.Generator seeded by (seed, k, c),
so the same command samples the same completions, `--resume` continues the same sampling, and
the completions do not depend on how many processes share the batch. A checkpoint in the middle
of a generation's μ steps carries that generation (its tensors and metrics) so the resumed run
trains on the very same completions and old log-probs.

Rewards are gathered over the processes (a group may straddle two) before the group advantages
(train.grpo.group_advantages). Old log-probs (μ > 1) and the reference's (β > 0: the model with its
adapters disabled) are computed at generation time in no_grad with the model in eval mode. TRL
1.16 computes them in train mode (the Trainer calls model.train() before _prepare_inputs), so
with dropout (GRPOConfig.disable_dropout defaults to False) its old and reference log-probs carry
dropout noise and ours do not; with --lora-dropout 0 (and Qwen's attention dropout, 0) the two
are the same.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

import lora
from models.qwen.generation import generate

from .grpo import completion_logps, group_advantages, grpo_loss, nanstd, reward_table, weighted_rewards


@dataclass
class GRPOSettings:
    """TRL GRPOConfig's names where they mean the same."""

    num_generations: int = 8
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: Optional[float] = None
    loss_type: str = "dapo"
    importance_sampling_level: str = "token"
    scale_rewards: str = "group"
    num_iterations: int = 1
    reward_weights: Optional[Sequence[float]] = None
    log_completions: Optional[str] = None   # a completions.jsonl path, or None


def seed_of(*parts) -> int:
    """A 63-bit seed of a tuple of ints/strings (stable across processes and runs)."""
    digest = hashlib.blake2b(repr(tuple(parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def completion_slots(n_prompts: int, G: int) -> List[int]:
    """The Trainer's train_dataset for GRPO: one slot per completion of an epoch (its length sets
    the epoch's size; the batch source makes the batches)."""
    return list(range(n_prompts * G))


def _call_through(model, fn: Callable, *args):
    """fn(inner model, *args) run as the forward of `model`: through a DDP wrapper's forward (so
    its gradient hooks are armed), or directly."""
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(model, DistributedDataParallel):
        return fn(model, *args)
    inner = model.module
    inner.forward = lambda *a: fn(inner, *a)   # an instance attribute wins over the class's forward
    try:
        return model(*args)
    finally:
        del inner.forward


class GRPOObjective:
    """The clipped GRPO-family loss of one micro-batch (train.grpo.grpo_loss), as a Trainer objective.

    count = 1 per micro-batch: the Trainer divides by grad_accum x world, so grpo / bnpo / dr_grpo
    are TRL's per-micro-batch losses / grad_accum averaged over processes, and dapo's normaliser
    num_items_in_batch / (grad_accum x world) makes it Σ over the whole batch / its completion tokens.
    Metrics are means over the micro-batches (and processes), as TRL logs them.
    """

    unit = "micro-batch"
    count_name = "micro_batches"
    example_name = "completions"

    def __init__(self, settings: GRPOSettings):
        self.s = settings

    def count(self, batch: Dict[str, torch.Tensor]) -> int:
        return 1

    def __call__(self, model, batch: Dict[str, torch.Tensor]):
        s = self.s
        n_prompt = int(batch["n_prompt"])
        logps, entropies = _call_through(model, _logps, batch["input_ids"], batch["attention_mask"], n_prompt,
                                         s.temperature)
        mask = batch["attention_mask"][:, n_prompt:]
        loss, metrics = grpo_loss(
            logps, batch.get("old_logps"), batch.get("ref_logps"), batch["advantages"], mask,
            loss_type=s.loss_type, importance_sampling_level=s.importance_sampling_level, epsilon=s.epsilon,
            epsilon_high=s.epsilon_high, beta=s.beta, max_completion_length=s.max_completion_length,
            num_items_in_batch=float(batch["num_items"]) / float(batch["micro_batches"]), grad_accum=1,
            entropies=entropies)
        keep = {k: v for k, v in metrics.items() if k not in ("clip_ratio/low_min", "clip_ratio/high_max")}
        return loss, keep


def _logps(model, ids, mask, n_prompt, temperature):
    return completion_logps(model, ids, mask, n_prompt, temperature)


class GRPOSource:
    """The Trainer's batch source for GRPO (see the module docstring).

    prompts: data.prompts.load_prompts rows; reward_functions: TRL-style callables (names from
    their __name__ or `reward_names`); tokenizer: decodes completions; eos_ids: the ids that end a
    completion (the chat stop and <|endoftext|>); pad_id: what fills a row after it.
    """

    def __init__(self, prompts: Sequence[dict], reward_functions: Sequence[Callable], settings: GRPOSettings, *,
                 tokenizer, eos_ids: Sequence[int], pad_id: int, seed: int = 0,
                 reward_names: Optional[Sequence[str]] = None):
        if not reward_functions:
            raise ValueError("GRPO needs at least one reward function")
        self.prompts, self.functions, self.s = list(prompts), list(reward_functions), settings
        self.names = list(reward_names) if reward_names else [getattr(f, "__name__", type(f).__name__)
                                                               for f in reward_functions]
        self.weights = torch.ones(len(self.functions)) if settings.reward_weights is None else \
            torch.tensor([float(w) for w in settings.reward_weights])
        if self.weights.numel() != len(self.functions):
            raise ValueError(f"{self.weights.numel()} reward weights for {len(self.functions)} reward functions")
        self.tok, self.eos_ids, self.pad_id, self.seed = tokenizer, list(eos_ids), int(pad_id), int(seed)
        self.buffer: Optional[List[dict]] = None
        self.buffer_generation = -1
        self.metrics: Dict[str, float] = {}
        self._orders: Dict[int, torch.Tensor] = {}
        self._log_trimmed = False

    # ------------------------------------------------------------------ wiring
    def attach(self, trainer) -> None:
        cfg = trainer.cfg
        self.model, self.dist, self.autocast = trainer.model, trainer.dist, trainer._autocast
        self.B, self.A, self.W, self.rank = cfg.batch_size, cfg.grad_accum, trainer.dist.world_size, trainer.dist.rank
        G = self.s.num_generations
        if (self.B * self.A * self.W) % G:
            raise ValueError(f"the global batch (batch_size {self.B} x grad_accum {self.A} x processes {self.W} = "
                             f"{self.B * self.A * self.W} completions) must be a multiple of num_generations {G}")
        self.out = Path(cfg.out_dir)

    # ------------------------------------------------------------------ BatchSource
    def batches(self, step: int) -> List[dict]:
        if self.s.log_completions and not self._log_trimmed:
            if self.dist.is_main:   # a resumed run: drop what the interrupted one logged from this step on
                self._trim(Path(self.s.log_completions), step)
            self._log_trimmed = True
        generation = (step - 1) // self.s.num_iterations
        if self.buffer is None or self.buffer_generation != generation:
            self._generate(generation, step)
        return self.buffer

    def step_metrics(self) -> Dict[str, float]:
        return dict(self.metrics)

    def gradient_expected(self) -> bool:
        """False when every advantage of this process's batch is 0 and there is no KL term."""
        return self.s.beta != 0.0 or any(bool(b["advantages"].abs().sum() > 0) for b in self.buffer or [])

    def state_tensors(self) -> Dict[str, torch.Tensor]:
        if self.s.num_iterations == 1 or self.buffer is None:
            return {}   # every step starts a new generation: nothing to carry
        out = {"generation": torch.tensor(self.buffer_generation)}
        for m, batch in enumerate(self.buffer):
            out.update({f"batch.{m}.{k}": v.contiguous() for k, v in batch.items()})
        out["metrics"] = torch.frombuffer(bytearray(json.dumps(self.metrics).encode()), dtype=torch.uint8).clone()
        return out

    def load_state_tensors(self, tensors: Dict[str, torch.Tensor], step: int) -> None:
        if not tensors:
            return
        self.buffer_generation = int(tensors["generation"])
        batches: Dict[int, dict] = {}
        for key, v in tensors.items():
            if key.startswith("batch."):
                _, m, name = key.split(".", 2)
                batches.setdefault(int(m), {})[name] = v
        self.buffer = [batches[m] for m in sorted(batches)]
        self.metrics = json.loads(bytes(tensors["metrics"].tolist()).decode())

    # ------------------------------------------------------------------ generation
    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            g = torch.Generator().manual_seed(seed_of(self.seed, "prompt-order", epoch))
            self._orders = {epoch: torch.randperm(len(self.prompts), generator=g)}
        return self._orders[epoch]

    def prompt_indices(self, generation: int) -> List[int]:
        """The P prompts of a generation (every process computes the same list)."""
        n, P = len(self.prompts), self.B * self.A * self.W // self.s.num_generations
        return [int(self._order(pos // n)[pos % n]) for pos in range(generation * P, generation * P + P)]

    def shuffle_order(self, generation: int) -> torch.Tensor:
        """The permutation of this process's B·A completions before they are split into micro-batches
        (TRL's shuffle_sequence_dict before split_tensor_dict), seeded by (seed, generation, rank)."""
        g = torch.Generator().manual_seed(seed_of(self.seed, "shuffle", generation, self.rank))
        return torch.randperm(self.B * self.A, generator=g)

    @torch.no_grad()
    def _generate(self, generation: int, step: int) -> None:
        s, G = self.s, self.s.num_generations
        n_local, N = self.B * self.A, self.B * self.A * self.W
        first = self.rank * n_local
        plist = self.prompt_indices(generation)
        rows = [self.prompts[plist[c // G]] for c in range(first, first + n_local)]
        T = max(len(r["prompt_ids"]) for r in rows)
        ids = torch.full((n_local, T), self.pad_id, dtype=torch.long)
        pmask = torch.zeros(n_local, T, dtype=torch.long)
        for i, r in enumerate(rows):
            p = r["prompt_ids"]
            ids[i, T - len(p):] = torch.tensor(p)
            pmask[i, T - len(p):] = 1
        device = next(self.model.parameters()).device
        gens = [torch.Generator(device=device).manual_seed(seed_of(self.seed, "sample", generation, c))
                for c in range(first, first + n_local)]
        with self.autocast():
            out = generate(self.model, ids.to(device), max_new_tokens=s.max_completion_length, temperature=s.temperature,
                           top_k=s.top_k, top_p=s.top_p, eos_ids=self.eos_ids, attention_mask=pmask.to(device),
                           pad_id=self.pad_id, generator=gens)
        comp = out[:, T:].cpu()
        C = comp.shape[1]
        is_eos = torch.isin(comp, torch.tensor(self.eos_ids)) if self.eos_ids else torch.zeros_like(comp, dtype=torch.bool)
        has_eos = is_eos.any(1)
        first_eos = torch.where(has_eos, is_eos.int().argmax(1), torch.full((n_local,), C - 1))
        cmask = (torch.arange(C)[None] <= first_eos[:, None]).long()
        lengths = cmask.sum(1)
        completion_ids = [comp[i, : int(lengths[i])].tolist() for i in range(n_local)]
        texts = [self.tok.decode([t for t in c if t not in self.eos_ids], skip_special_tokens=True)
                 for c in completion_ids]
        completions = [[{"role": "assistant", "content": t}] if r["chat"] else t for r, t in zip(rows, texts)]
        prompts = [r["prompt"] for r in rows]
        keys = sorted({k for r in rows for k in r["columns"]} - {"prompts", "completions", "completion_ids"})
        columns = {k: [r["columns"].get(k) for r in rows] for k in keys}
        table = reward_table(self.functions, prompts, completions, completion_ids, **columns)

        # ---- gathered over the processes: rewards, lengths, truncation
        F_ = len(self.functions)
        full = torch.zeros(N, F_ + 2, dtype=torch.float64)
        full[first : first + n_local, :F_] = table.double()
        full[first : first + n_local, F_] = lengths.double()
        full[first : first + n_local, F_ + 1] = (~has_eos).double()
        if self.W > 1:
            full = torch.tensor(self.dist.all_reduce(full.flatten().tolist()), dtype=torch.float64).view(N, F_ + 2)
        per_function = full[:, :F_].float()
        all_lengths, truncated = full[:, F_], full[:, F_ + 1]
        rewards = weighted_rewards(per_function, self.weights)
        advantages = group_advantages(rewards, G, s.scale_rewards)
        local_adv = advantages[first : first + n_local]
        local_rewards = rewards[first : first + n_local]
        self.metrics = self._metrics(per_function, rewards, all_lengths, truncated)
        num_items = float(all_lengths.sum())

        # ---- the micro-batches, from this process's completions shuffled as TRL shuffles them
        perm = self.shuffle_order(generation)
        full_ids = torch.cat([ids, comp], 1)[perm]
        full_mask = torch.cat([pmask, cmask], 1)[perm]
        local_adv = local_adv[perm]
        batches = []
        for m in range(self.A):
            sl = slice(m * self.B, (m + 1) * self.B)
            batch = {"input_ids": full_ids[sl].clone(), "attention_mask": full_mask[sl].clone(),
                     "advantages": local_adv[sl].clone(), "n_prompt": torch.tensor(T),
                     "num_items": torch.tensor(num_items, dtype=torch.float64),
                     "micro_batches": torch.tensor(self.A * self.W)}
            batches.append(batch)
        self._extra_logps(batches, T)
        self.buffer, self.buffer_generation = batches, generation
        if s.log_completions:
            self._log(step, rows, texts, completion_ids, table, local_rewards, advantages[first : first + n_local])

    def _extra_logps(self, batches: List[dict], T: int) -> None:
        """Old log-probs (μ > 1) and the reference's (β > 0), in eval mode, no grad."""
        s = self.s
        if s.num_iterations == 1 and s.beta == 0.0:
            return
        was = self.model.training
        self.model.eval()
        try:
            with self.autocast():
                for b in batches:
                    ids, mask = b["input_ids"], b["attention_mask"]
                    dev = next(self.model.parameters()).device
                    if s.num_iterations > 1:
                        b["old_logps"] = completion_logps(self.model, ids.to(dev), mask.to(dev), T, s.temperature)[0].cpu()
                    if s.beta != 0.0:
                        ctx = lora.disable_adapters(self.model) if lora.has_adapters(self.model) else nullcontext()
                        with ctx:
                            b["ref_logps"] = completion_logps(self.model, ids.to(dev), mask.to(dev), T,
                                                              s.temperature)[0].cpu()
        finally:
            self.model.train(was)

    def _metrics(self, per_function, rewards, lengths, truncated) -> Dict[str, float]:
        """TRL's generation metrics over the global batch."""
        G = self.s.num_generations
        groups = rewards.view(-1, G)
        if self.s.scale_rewards == "batch":
            std = nanstd(rewards)
        else:
            std = nanstd(groups, dim=1) if G > 1 else torch.zeros(groups.shape[0])
        out = {"reward": float(torch.nanmean(torch.nanmean(groups, dim=1))), "reward_std": float(torch.nanmean(std)),
               "frac_reward_zero_std": float((nanstd(groups, dim=1) < 1e-6).float().mean()) if G > 1 else 1.0,
               "completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
               "completions/max_length": float(lengths.max()), "completions/clipped_ratio": float(truncated.mean())}
        for j, name in enumerate(self.names):
            col = per_function[:, j]
            out[f"rewards/{name}/mean"] = float(torch.nanmean(col))
            out[f"rewards/{name}/std"] = float(nanstd(col)) if col.numel() > 1 else 0.0
        return {k: (v if math.isfinite(v) else None) for k, v in out.items()}

    # ------------------------------------------------------------------ completions.jsonl
    def _log(self, step, rows, texts, completion_ids, table, rewards, advantages) -> None:
        lines = []
        for i, r in enumerate(rows):
            lines.append(json.dumps({
                "step": step, "prompt": r["prompt"], "completion": texts[i], "completion_ids": completion_ids[i],
                "rewards": {n: (None if math.isnan(float(table[i, j])) else float(table[i, j]))
                            for j, n in enumerate(self.names)},
                "reward": None if math.isnan(float(rewards[i])) else float(rewards[i]),
                "advantage": float(advantages[i])}, ensure_ascii=False))
        blobs = self.dist.gather_bytes("\n".join(lines).encode("utf-8"))
        if not self.dist.is_main:
            return
        with open(Path(self.s.log_completions), "a", encoding="utf-8") as f:
            for b in blobs:
                if b:
                    f.write(b.decode("utf-8") + "\n")
            f.flush()
            os.fsync(f.fileno())

    @staticmethod
    def _trim(path: Path, step: int) -> None:
        """Keep the rows of steps before `step` (rewritten atomically); a torn last line goes."""
        if not path.is_file():
            return
        keep = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    if json.loads(line)["step"] < step:
                        keep.append(line if line.endswith("\n") else line + "\n")
                except (ValueError, KeyError, TypeError):
                    continue
        tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(keep)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
