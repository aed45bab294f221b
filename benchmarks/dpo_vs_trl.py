"""Side-by-side DPO step: this library vs TRL's DPOTrainer on transformers + PEFT.

Both sides train the same Qwen-architecture checkpoint (random bf16 weights of a named shape,
benchmarks/vs_hf.py's checkpoint_dir) from the same initial LoRA adapter (r=16 alpha=16
all-linear, dropout 0; written once by this library in PEFT format and loaded on both sides, so
the loss curves can be compared step by step), on the same preference batches, each side in its
own process:

  batch:     --pairs pairs of random token ids; every pair is a prompt of --prompt tokens and a
             chosen and a rejected response of --response tokens each; only the responses are
             scored (labels -100 on the prompt). One step = one forward of the 2 x pairs rows,
             chosen then rejected, of prompt + response tokens.
  loss:      sigmoid DPO, beta 0.1; the reference is the same model with its adapters disabled
             (no_grad), the policy forward under gradient checkpointing on both sides.
  step:      loss.backward(), AdamW (lr --lr, no weight decay, no clipping), zero_grad.
  ours:      models.qwen + lora + train.preference.PreferenceObjective + train.AdamW, the batch
             from data.preference_collate (what examples/dpo.py's Trainer runs per micro-batch).
  trl:       trl.DPOTrainer built on the PEFT model (peft_config: TRL wraps the model itself),
             never .train()-ed: each step is DPOTrainer.training_step on a batch of TRL's own
             DataCollatorForPreference (the reference pass with the adapter disabled, the fused
             chunked log-prob head, TRL's metrics, accelerator.backward), then torch.optim.AdamW.
             TRL's dataset preparation (tokenising text) is skipped: the batches are token ids.

Weights are bf16 on both sides (no autocast; --dtype fp32 for both in fp32), LoRA parameters
fp32 (PEFT's default on a bf16 base, and ours). Both sides print the loss and rewards/margins of
every step. In fp32 the two curves agree to float rounding (the same function computed twice).
In bf16 they agree to bf16 noise, which is large here: a fresh adapter's log-ratio π - ρ is the
small difference of two bf16 forwards of a few hundred scored tokens, so at lr 1e-4 each side's
loss after the first step (exactly ln 2 on both) sits a few 1e-3 from the fp32 curve.

    python benchmarks/dpo_vs_trl.py --threads 1 --steps 4 --repeats 2
    python benchmarks/dpo_vs_trl.py --shape qwen3.5-bench --pairs 1
    python benchmarks/dpo_vs_trl.py --profile trl --threads 1     # where one side's step goes

Tokens per step count every row the policy forward runs: 2 x pairs x (prompt + response).
Speed: the median timed step of a worker run; each side runs --repeats times, interleaved with
the other, and its best run counts. On CPU tokens per CPU-second of the worker (process time)
is given too: with --threads 1 it is the speed of an idle machine whatever else shares the host.
Memory: peak RSS of the worker process on CPU (imports and loading included),
torch.cuda.max_memory_allocated on CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vs_hf import checkpoint_dir, print_every_run, run_worker  # noqa: E402  (benchmarks/ is on sys.path as the script's folder)

LORA = dict(r=16, alpha=16)
BETA = 0.1
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def initial_adapter(model_dir: Path) -> Path:
    """A fresh LoRA adapter on the checkpoint (our init: A random, B = 0), in PEFT format, written once."""
    import lora
    from models.qwen import load

    path = model_dir.parent / f"{model_dir.name}-lora-r{LORA['r']}-init"
    if (path / "adapter_config.json").exists():
        return path
    torch.manual_seed(0)
    model = load(model_dir, dtype=torch.bfloat16)
    lora.inject(model, r=LORA["r"], alpha=LORA["alpha"], dropout=0.0, targets="all-linear")
    lora.save(model, path)
    return path


def pairs(args, vocab: int, step: int) -> list[dict]:
    """The pairs of one step: {prompt, chosen, rejected} token-id tensors of --prompt / --response tokens."""
    g = torch.Generator().manual_seed(1234 + step)
    hi = min(vocab, 151643)  # ids of ordinary tokens
    return [{"prompt": torch.randint(0, hi, (args.prompt,), generator=g),
             "chosen": torch.randint(0, hi, (args.response,), generator=g),
             "rejected": torch.randint(0, hi, (args.response,), generator=g)} for _ in range(args.pairs)]


# ---------------------------------------------------------------------------- workers
def run_ours(args, model_dir: Path, adapter: Path):
    import lora
    import train
    from data.preference import preference_collate
    from models.qwen import load
    from train.preference import PreferenceObjective

    model = load(model_dir, dtype=DTYPES[args.dtype], device=args.device)
    lora.inject(model, r=LORA["r"], alpha=LORA["alpha"], dropout=0.0, targets="all-linear")
    lora.load(model, adapter)  # the shared initial weights
    model.enable_gradient_checkpointing(True)
    model.train()
    opt = train.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    objective = PreferenceObjective("sigmoid", beta=BETA, reference="adapters")

    def batch(step_pairs):
        unscored = torch.full((args.prompt,), -100)
        items = [{"chosen_input_ids": torch.cat([p["prompt"], p["chosen"]]),
                  "chosen_labels": torch.cat([unscored, p["chosen"]]),
                  "rejected_input_ids": torch.cat([p["prompt"], p["rejected"]]),
                  "rejected_labels": torch.cat([unscored, p["rejected"]])} for p in step_pairs]
        return {k: v.to(args.device) for k, v in preference_collate(items).items()}

    def step(b):
        n = objective.count(b)
        loss_sum, metrics = objective(model, b)
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss_sum.detach()) / n, float(metrics["rewards/margins"]) / n

    return model.config.vocab_size, batch, step


def run_trl(args, model_dir: Path, adapter: Path):
    import pyarrow as pa
    from datasets import Dataset
    from datasets.table import InMemoryTable
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    # The batches are token ids: TRL's text preparation is skipped, so a one-word tokenizer and a
    # one-row placeholder dataset (fixed fingerprint: no hashing) are all DPOTrainer needs.
    DPOTrainer._prepare_dataset = lambda self, dataset, *a, **k: dataset
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0}, unk_token="<pad>")),
                                  pad_token="<pad>", eos_token="<pad>")
    placeholder = Dataset(InMemoryTable(pa.table({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"]})),
                          fingerprint="placeholder")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[args.dtype], device_map=args.device)
    config = DPOConfig(output_dir=str(Path(args.cache) / "trl-out"), beta=BETA, loss_type=["sigmoid"],
                       report_to="none", use_cpu=args.device == "cpu", bf16=False, learning_rate=args.lr,
                       per_device_train_batch_size=args.pairs, activation_checkpointing=True,
                       activation_checkpointing_kwargs={"use_reentrant": False}, seed=0)
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(model=model, args=config, processing_class=tok, train_dataset=placeholder,
                             peft_config=peft_config)
    result = set_peft_model_state_dict(trainer.model, load_file(adapter / "adapter_model.safetensors"))
    if result.unexpected_keys:
        sys.exit(f"the initial adapter does not fit the PEFT model: {result.unexpected_keys[:3]}")
    # Trainer.train() switches checkpointing on (in transformers 5, not at construction): the same call here.
    trainer.model.activation_checkpointing_enable(activation_checkpointing_kwargs=config.activation_checkpointing_kwargs)
    if not trainer.model.is_activation_checkpointing:
        sys.exit("the TRL model did not enable activation checkpointing")
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, read by training_step
    opt = torch.optim.AdamW([p for p in trainer.model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    collator = DataCollatorForPreference(pad_token_id=0)

    def batch(step_pairs):
        return collator([{"prompt_ids": p["prompt"].tolist(), "chosen_ids": p["chosen"].tolist(),
                          "rejected_ids": p["rejected"].tolist()} for p in step_pairs])

    def step(b):
        loss = trainer.training_step(trainer.model, b)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss), trainer._metrics["train"]["rewards/margins"][-1]

    return model.config.vocab_size, batch, step


def worker(args) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    run = run_ours if args.worker == "ours" else run_trl
    vocab, make_batch, step = run(args, Path(args.path), Path(args.adapter))
    data = [make_batch(pairs(args, vocab, i)) for i in range(args.steps)]
    losses, margins, times, cpu_times = [], [], [], []
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for b in data:
        t, cpu = time.perf_counter(), time.process_time()
        loss, margin = step(b)  # both return Python floats: the step's work is done when they come back
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - cpu)
        losses.append(loss)
        margins.append(margin)
    tokens = 2 * args.pairs * (args.prompt + args.response)
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps(dict(side=args.worker, tokens_per_s=tokens / statistics.median(times[args.warmup:]),
                          tokens_per_cpu_s=tokens / statistics.median(cpu_times[args.warmup:]),
                          peak_mib=peak, losses=losses, margins=margins, step_s=times)))


def profile_side(args, model_dir: Path, adapter: Path) -> None:
    """One side in this process: a warm-up step, then one step under torch.profiler; the ops with the
    most self CPU time and the matmuls by input shape (where that side's time goes)."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    vocab, make_batch, step = (run_ours if args.profile == "ours" else run_trl)(args, model_dir, adapter)
    warm, timed = (make_batch(pairs(args, vocab, i)) for i in range(2))
    step(warm)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t = time.perf_counter()
        step(timed)
        wall = time.perf_counter() - t
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e3
    print(f"{args.profile} | {args.shape} {args.dtype} | {args.pairs} pairs x ({args.prompt} + {args.response}) | "
          f"threads {args.threads}: {wall:.2f} s wall for the profiled step, {total:.0f} ms self CPU time")
    print(f"\n{'op':58}{'calls':>8}{'ms':>10}{'share':>8}")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.rows]:
        ms = e.self_cpu_time_total / 1e3
        print(f"{e.key[:58]:58}{e.count:8d}{ms:10.1f}{ms / total:8.1%}")
    shaped = [e for e in prof.key_averages(group_by_input_shape=True) if e.key in ("aten::mm", "aten::addmm")]
    print(f"\n{'op':14}{'calls':>8}{'ms':>10}   input shapes")
    for e in sorted(shaped, key=lambda e: -e.self_cpu_time_total)[: args.rows]:
        print(f"{e.key:14}{e.count:8d}{e.self_cpu_time_total / 1e3:10.1f}   {str(e.input_shapes)[:100]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="bench-100m",
                   help="a shape of benchmarks/shapes.py (bench-100m, bench-moe, qwen3.5-bench) or a QwenConfig preset")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--pairs", type=int, default=2, help="preference pairs per step (2 x pairs rows)")
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens of every pair")
    p.add_argument("--response", type=int, default=256, help="tokens of each response")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                   help="the weights' dtype on both sides (fp32: the two loss curves agree to float rounding)")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per side")
    p.add_argument("--repeats", type=int, default=2,
                   help="worker runs per side, interleaved ours/trl/ours/trl; the best run of each side counts")
    p.add_argument("--warmup", type=int, default=1, help="steps left out of the timing")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--cache", default=os.environ.get("QWEN_TUNE_CACHE", str(Path.home() / ".cache" / "qwen-tune")))
    p.add_argument("--profile", choices=["ours", "trl"],
                   help="instead of the comparison: one step of that side under torch.profiler, in this process")
    p.add_argument("--rows", type=int, default=25, help="ops listed by --profile")
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--adapter", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.steps <= args.warmup:
        p.error(f"--steps {args.steps}: needs more steps than --warmup {args.warmup} to time one")

    model_dir = checkpoint_dir(args.shape, Path(args.cache))
    adapter = initial_adapter(model_dir)
    if args.profile:
        return profile_side(args, model_dir, adapter)
    runs: dict[str, list[dict]] = {"ours": [], "trl": []}
    for _ in range(args.repeats):
        for side in ("ours", "trl"):
            cmd = [sys.executable, __file__, "--worker", side, "--path", str(model_dir), "--adapter", str(adapter)] + [
                f"--{k}={v}" for k, v in vars(args).items()
                if k in ("device", "dtype", "pairs", "prompt", "response", "lr", "steps", "warmup", "threads", "cache")
            ]
            runs[side].append(run_worker(cmd, side))
    best = {side: max(r, key=lambda d: d["tokens_per_s"]) for side, r in runs.items()}
    ours, trl = best["ours"], best["trl"]
    tokens = 2 * args.pairs * (args.prompt + args.response)
    unit = "peak MiB " + ("(cuda)" if args.device == "cuda" else "(RSS)")
    print(f"\nsigmoid DPO, beta {BETA} | {args.shape} {args.dtype} | {args.device} | {args.pairs} pairs x ({args.prompt} prompt + "
          f"{args.response} response) = {tokens} tokens/step | {args.steps} steps ({args.warmup} warm-up) | "
          f"threads {args.threads} | best of {args.repeats} runs per side")
    print(f"{'':16}{'ours':>12}{'trl+peft':>12}{'ratio':>10}")
    print(f"{'tokens/s':16}{ours['tokens_per_s']:12.1f}{trl['tokens_per_s']:12.1f}"
          f"{ours['tokens_per_s'] / trl['tokens_per_s']:10.2f}")
    if args.device == "cpu":
        cpu = {side: max(d["tokens_per_cpu_s"] for d in r) for side, r in runs.items()}
        print(f"{'tokens/CPU-s':16}{cpu['ours']:12.1f}{cpu['trl']:12.1f}{cpu['ours'] / cpu['trl']:10.2f}")
    print(f"{unit:16}{ours['peak_mib']:12.0f}{trl['peak_mib']:12.0f}{ours['peak_mib'] / trl['peak_mib']:10.2f}")
    print("loss per step  ours:", " ".join(f"{x:.6f}" for x in ours["losses"]))
    print("               trl: ", " ".join(f"{x:.6f}" for x in trl["losses"]))
    print(f"max |loss ours - loss trl| over the steps: {max(abs(a - b) for a, b in zip(ours['losses'], trl['losses'])):.2e}")
    print("margin/step    ours:", " ".join(f"{x:.5f}" for x in ours["margins"]))
    print("               trl: ", " ".join(f"{x:.5f}" for x in trl["margins"]))
    print_every_run(runs, args.device)


if __name__ == "__main__":
    main()
