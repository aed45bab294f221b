"""Side-by-side GRPO step: this library vs TRL 1.16's GRPO code on transformers + PEFT.

Both sides run the same random Qwen checkpoint (benchmarks/vs_hf.py's checkpoint_dir, bf16 by
default) with the same initial LoRA adapter (r=16 alpha=16 all-linear, dropout 0; dpo_vs_trl.py's
initial_adapter), each side in its own process. One step, on both:

  generation: --prompts prompts of --prompt random token ids, G = --generations completions each,
              sampled at temperature 1 for exactly --completion tokens (no EOS: ours with no eos
              ids, transformers with min_new_tokens = max_new_tokens), so the work is equal;
  scoring:    one reward (the share of even token ids), group advantages (TRL's definitions);
  update:     the dapo loss over the completions (beta 0, mu 1), backward, AdamW (lr --lr).
  ours:       models.qwen.generate (KV cache, one torch.Generator per completion, as GRPOSource),
              train.grpo.group_advantages, train.grpo_source.GRPOObjective (log-probs through the
              chunked head), train.AdamW: what examples/grpo.py runs per step.
  trl:        PEFT model.generate (what GRPOTrainer calls without vLLM), TRL's advantages
              expression, GRPOTrainer._compute_loss (TRL's own code) on a stub whose log-probs come
              from the PEFT model's logits over the completion positions (logits_to_keep) through
              trl.trainer.utils.selective_log_softmax, as _get_per_token_logps_and_entropies does;
              then torch.optim.AdamW. Not the whole GRPOTrainer.training_step (no accelerate,
              dataset or logging machinery): those add time on TRL's side, so this favours TRL.
              That is --trl compute-loss; the default, --trl trainer, times TRL's real
              GRPOTrainer.training_step (its generate with min_new_tokens = --completion, decoding,
              reward, advantages, _compute_loss, backward) and the trainer's AdamW step; only its
              prompt tokenizer is replaced by the step's prompt ids (run_trl_trainer). Its generation
              time is GRPOTrainer._generate (tokenize stub + generate + decode); the rest is training.

    python benchmarks/grpo_vs_trl.py --threads 2 --steps 3 --repeats 2
    python benchmarks/grpo_vs_trl.py --shape bench-100m --prompts 2 --generations 8 --prompt 64 --completion 64

Tokens per step: prompts x G x (prompt + completion). Generation and training (scoring + loss +
backward + optimizer) are timed separately; the median of the timed steps of a worker run, the
best run per side (runs interleaved). Memory: peak RSS of the worker process (imports included).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
import types
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dpo_vs_trl import LORA, initial_adapter  # noqa: E402
from vs_hf import checkpoint_dir, run_worker  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def prompts(args, vocab: int, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234 + step)
    return torch.randint(0, min(vocab, 151643), (args.prompts, args.prompt), generator=g)


def even_share(ids: torch.Tensor) -> torch.Tensor:
    return (ids % 2 == 0).float().mean(1)


def run_ours(args, model_dir: Path, adapter: Path):
    import lora
    import train
    from models.qwen import load
    from models.qwen.generation import generate
    from train.grpo import group_advantages
    from train.grpo_source import GRPOObjective, GRPOSettings

    model = load(model_dir, dtype=DTYPES[args.dtype])
    lora.inject(model, r=LORA["r"], alpha=LORA["alpha"], dropout=0.0, targets="all-linear")
    lora.load(model, adapter)
    model.enable_gradient_checkpointing(True)
    model.train()
    opt = train.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    G, C = args.generations, args.completion
    objective = GRPOObjective(GRPOSettings(num_generations=G, max_completion_length=C, temperature=1.0))

    def step(prompt_ids, k):
        t0 = time.perf_counter()
        ids = prompt_ids.repeat_interleave(G, 0)
        gens = [torch.Generator().manual_seed(k * 1000 + i) for i in range(ids.shape[0])]
        out = generate(model, ids, max_new_tokens=C, temperature=1.0, eos_ids=[], generator=gens)
        t1 = time.perf_counter()
        adv = group_advantages(even_share(out[:, -C:]), G, "group")
        mask = torch.ones_like(out)
        batch = {"input_ids": out, "attention_mask": mask, "advantages": adv, "n_prompt": torch.tensor(ids.shape[1]),
                 "num_items": torch.tensor(float(out.shape[0] * C)), "micro_batches": torch.tensor(1)}
        loss, _ = objective(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach()), t1 - t0, time.perf_counter() - t1

    return model.config.vocab_size, step


def run_trl(args, model_dir: Path, adapter: Path):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from trl import GRPOTrainer
    from trl.trainer.utils import entropy_from_logits, nanstd, selective_log_softmax

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[args.dtype])
    cfg = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules="all-linear")
    model = get_peft_model(hf, cfg)
    set_peft_model_state_dict(model, load_file(adapter / "adapter_model.safetensors"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    G, C = args.generations, args.completion

    def per_token(m, input_ids, attention_mask, logits_to_keep, **kw):
        logits = m(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep + 1).logits
        logits = logits[:, :-1][:, -logits_to_keep:] / 1.0
        return selective_log_softmax(logits, input_ids[:, -logits_to_keep:]), entropy_from_logits(logits), None

    acc = types.SimpleNamespace(num_processes=1, reduce=lambda t, reduction: t, gather=lambda t: t,
                                gather_for_metrics=lambda t: t)

    def step(prompt_ids, k):
        t0 = time.perf_counter()
        torch.manual_seed(k)
        ids = prompt_ids.repeat_interleave(G, 0)
        with torch.no_grad():
            model.eval()
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                 top_k=0, top_p=1.0, max_new_tokens=C, min_new_tokens=C, eos_token_id=None,
                                 pad_token_id=0, use_cache=True)
            model.train()
        t1 = time.perf_counter()
        rewards = even_share(out[:, -C:])
        mean = rewards.view(-1, G).mean(1).repeat_interleave(G)
        std = rewards.view(-1, G).std(1).repeat_interleave(G)
        adv = (rewards - mean) / (std + 1e-4)
        _ = nanstd  # (TRL's own std helper; the groups here have no NaN)
        stub = types.SimpleNamespace(
            top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=0.0,
            args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
            loss_type="dapo", epsilon_low=0.2, epsilon_high=0.2, use_vllm=False,
            vllm_importance_sampling_correction=False, model=model, current_gradient_accumulation_steps=1,
            max_completion_length=C, accelerator=acc, _entropy_bonus_enabled=False, aux_loss_enabled=False,
            _metrics={"train": defaultdict(list)}, _get_per_token_logps_and_entropies=per_token, temperature=1.0)
        mask = torch.ones(out.shape[0], C, dtype=torch.long)
        inputs = {"prompt_ids": out[:, :-C], "prompt_mask": torch.ones_like(out[:, :-C]), "completion_ids": out[:, -C:],
                  "completion_mask": mask, "advantages": adv, "num_items_in_batch": torch.tensor(float(mask.sum()))}
        loss = GRPOTrainer._compute_loss(stub, model, inputs)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach()), t1 - t0, time.perf_counter() - t1

    return hf.config.vocab_size, step


def run_trl_trainer(args, model_dir: Path, adapter: Path):
    """TRL's own GRPOTrainer.training_step (generation, decoding, reward, advantages, loss,
    backward: TRL's code end to end), then the trainer's AdamW step. One thing is replaced: the
    prompt tokenizer (_tokenize_prompts) returns the step's random prompt ids, which ours is given
    too, so both sides generate from the same ids (tokenization is timed on neither side)."""
    import tempfile

    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from models.qwen import Tokenizer

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[args.dtype])
    cfg = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules="all-linear")
    model = get_peft_model(hf, cfg)
    set_peft_model_state_dict(model, load_file(adapter / "adapter_model.safetensors"))
    G, C = args.generations, args.completion
    work = Path(tempfile.mkdtemp(prefix="grpo-vs-trl-"))
    Tokenizer.default().save_pretrained(work / "tokenizer")   # the checkpoint has none; Qwen2.5's
    tok = AutoTokenizer.from_pretrained(work / "tokenizer")
    n = args.prompts * G
    config = GRPOConfig(
        output_dir=str(work / "out"), per_device_train_batch_size=n, gradient_accumulation_steps=1,
        num_generations=G, max_completion_length=C, temperature=1.0, top_p=1.0, top_k=0, beta=0.0,
        loss_type="dapo", epsilon=0.2, learning_rate=args.lr, weight_decay=0.0, optim="adamw_torch",
        lr_scheduler_type="constant", gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, generation_kwargs={"min_new_tokens": C},
        use_cpu=True, bf16=False, report_to=[], save_strategy="no", max_steps=args.steps, seed=0,
        dataloader_num_workers=0, disable_dropout=True, log_completions=False)

    def even_share_reward(completions, completion_ids, **kw):
        return [sum(t % 2 == 0 for t in ids) / len(ids) for ids in completion_ids]

    rows = [{"prompt": f"p{i}"} for i in range(args.prompts)]
    trainer = GRPOTrainer(model=model, reward_funcs=[even_share_reward], args=config,
                          train_dataset=Dataset.from_list(rows), processing_class=tok)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1   # set by Trainer's training loop, which is not run
    current: dict = {}
    trainer._tokenize_prompts = lambda ps: ([current[p] for p in ps], None, {})
    timed = {"generation": 0.0}
    generate = trainer._generate

    def timed_generate(prompts):
        t = time.perf_counter()
        try:
            return generate(prompts)
        finally:
            timed["generation"] += time.perf_counter() - t

    trainer._generate = timed_generate
    model = trainer.model

    def step(prompt_ids, k):
        torch.manual_seed(k)
        current.clear()
        current.update({f"p{i}": row.tolist() for i, row in enumerate(prompt_ids)})
        inputs = [rows[i] for i in range(args.prompts) for _ in range(G)]   # RepeatSampler's order
        timed["generation"] = 0.0
        t0 = time.perf_counter()
        loss = trainer.training_step(model, inputs, None)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        total = time.perf_counter() - t0
        lengths = trainer._metrics["train"]["completions/mean_length"]
        assert lengths and lengths[-1] == C, f"TRL sampled completions of mean length {lengths[-1:]}, not {C}"
        return float(loss), timed["generation"], total - timed["generation"]

    return hf.config.vocab_size, step


def worker(args) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    run = run_ours if args.worker == "ours" else run_trl_trainer if args.trl == "trainer" else run_trl
    vocab, step = run(args, Path(args.path), Path(args.adapter))
    gen_t, train_t, total = [], [], []
    for k in range(args.steps):
        _, g, t = step(prompts(args, vocab, k), k)
        gen_t.append(g)
        train_t.append(t)
        total.append(g + t)
    tokens = args.prompts * args.generations * (args.prompt + args.completion)
    w = args.warmup
    print(json.dumps(dict(side=args.worker, tokens_per_s=tokens / statistics.median(total[w:]),
                          generation_s=statistics.median(gen_t[w:]), training_s=statistics.median(train_t[w:]),
                          peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, step_s=total)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="bench-100m", help="a shape of benchmarks/shapes.py")
    p.add_argument("--prompts", type=int, default=1)
    p.add_argument("--generations", type=int, default=8, help="G")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    p.add_argument("--completion", type=int, default=64, help="completion tokens (fixed on both sides)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--trl", choices=["trainer", "compute-loss"], default="trainer",
                   help="TRL's side: GRPOTrainer.training_step itself (default), or transformers' generate + "
                        "GRPOTrainer._compute_loss on a stub (no trainer machinery)")
    p.add_argument("--cache", default=os.environ.get("QWEN_TUNE_CACHE", str(Path.home() / ".cache" / "qwen-tune")))
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--adapter", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.steps <= args.warmup:
        p.error(f"--steps {args.steps}: needs more steps than --warmup {args.warmup}")
    model_dir = checkpoint_dir(args.shape, Path(args.cache))
    adapter = initial_adapter(model_dir)
    runs = {"ours": [], "trl": []}
    keys = ("prompts", "generations", "prompt", "completion", "lr", "dtype", "steps", "warmup", "threads", "cache", "trl")
    for _ in range(args.repeats):
        for side in ("ours", "trl"):
            cmd = [sys.executable, __file__, "--worker", side, "--path", str(model_dir), "--adapter", str(adapter)] + [
                f"--{k}={getattr(args, k)}" for k in keys]
            runs[side].append(run_worker(cmd, side))
    best = {side: max(r, key=lambda d: d["tokens_per_s"]) for side, r in runs.items()}
    ours, trl = best["ours"], best["trl"]
    tokens = args.prompts * args.generations * (args.prompt + args.completion)
    print(f"\nGRPO step (dapo, beta 0, LoRA r{LORA['r']}) | {args.shape} {args.dtype} | cpu | {args.prompts} prompts x "
          f"G {args.generations} x ({args.prompt} prompt + {args.completion} completion) = {tokens} tokens/step | "
          f"{args.steps} steps ({args.warmup} warm-up) | threads {args.threads} | best of {args.repeats} runs per side")
    print(f"TRL side: {'GRPOTrainer.training_step' if args.trl == 'trainer' else 'generate + GRPOTrainer._compute_loss'}")
    print(f"{'':18}{'ours':>12}{'trl+peft':>12}{'ratio':>10}")
    print(f"{'tokens/s':18}{ours['tokens_per_s']:12.1f}{trl['tokens_per_s']:12.1f}{ours['tokens_per_s'] / trl['tokens_per_s']:10.2f}")
    print(f"{'generation s':18}{ours['generation_s']:12.2f}{trl['generation_s']:12.2f}{trl['generation_s'] / ours['generation_s']:10.2f}")
    print(f"{'training s':18}{ours['training_s']:12.2f}{trl['training_s']:12.2f}{trl['training_s'] / ours['training_s']:10.2f}")
    print(f"{'peak MiB (RSS)':18}{ours['peak_mib']:12.0f}{trl['peak_mib']:12.0f}{ours['peak_mib'] / trl['peak_mib']:10.2f}")
    for side, r in runs.items():
        print(f"tokens/s of every {side} run:", " ".join(f"{d['tokens_per_s']:.1f}" for d in r))


if __name__ == "__main__":
    main()
