"""Side-by-side training benchmark: this library vs transformers + PEFT (+ bitsandbytes).

Both sides train the same Qwen-architecture checkpoint (random weights of a named shape,
written once to disk in HF format), on the same token batches, with the same settings
(LoRA r=16 alpha=16 all-linear, dropout 0, bf16, gradient checkpointing on, AdamW lr 1e-4),
each in its own process, and the table reports tokens/s, peak memory, the loss after the
same steps, the ratios, and the achieved FLOP/s against this machine's measured matmul peak.

    python benchmarks/vs_hf.py                              # CPU, LoRA, the 100M shape
    python benchmarks/vs_hf.py --mode qlora                 # NF4 base on both sides
    python benchmarks/vs_hf.py --device cuda --shape 7b --seq 2048 --batch 1 --mode qlora
    python benchmarks/vs_hf.py --shape qwen3.5-bench        # Qwen3.5 text: Gated DeltaNet + gated attention
    python benchmarks/vs_hf.py --shape bench-moe            # Qwen3-MoE: 32 experts, top 4

Qwen3-MoE shapes: PEFT's "all-linear" on transformers 5 also adapts the router (it maps the
router of the v4 model, an nn.Linear there, onto `gate.weight`), which this library never does,
so the transformers side names the seven projections instead; PEFT turns gate/up/down_proj into
LoRA on the fused expert tensors (gate_up_proj at rank 2r). Both start from the same function;
PEFT's fused gate_up adapter is one rank-2r matrix where ours are two rank-r ones, so the losses
agree exactly at the first step and closely after.

Peak memory: peak RSS of the worker process on CPU (includes loading), and
torch.cuda.max_memory_allocated on CUDA. Speed: tokens per median timed step of a worker
run; each side runs --repeats times, interleaved with the other, and its best run counts
(the same rule on both sides, so host noise on a shared VM cannot favour either). On CPU the
table also gives tokens per CPU-second of the worker (process time, all its threads): with
--threads 1 that is the wall speed of an idle machine, whatever else shares the VM (with more
threads it counts their spin-waits too).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def checkpoint_dir(shape: str, cache: Path) -> Path:
    """Write random bf16 weights of `shape` once (our save: HF format), return the dir."""
    from models.qwen import Qwen, save
    from shapes import bench_config

    path = cache / f"bench-{shape}-bf16"
    if (path / "config.json").exists():
        return path
    torch.manual_seed(0)
    cfg = bench_config(shape, torch_dtype="bfloat16")
    if cfg.num_parameters() <= 1e9:
        model = Qwen(cfg).to(torch.bfloat16)
    else:
        # A 7B model built the usual way is 30 GB of fp32 and minutes of init on the lent GPU
        # machine's clock: build it on the meta device in bf16, allocate, and initialise there
        # (N(0, 0.02), norms 1 or 0 when zero-centred, biases 0: the way HF initialises Qwen).
        with torch.device("meta"):
            model = Qwen(cfg).to(torch.bfloat16)
        model = model.to_empty(device="cpu")
        model.init_weights()
    save(model, path)
    return path


def batches(args, vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, min(vocab, 151643), (args.batch, args.seq), generator=g) for _ in range(args.steps)]


def matmul_peak(device: str) -> float:
    """Best of bf16 and fp32 GEMM throughput on this device (FLOP/s), 2048^3 problems."""
    best = 0.0
    for dtype in (torch.bfloat16, torch.float32):
        n = 2048
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        reps = 1 if device == "cpu" else 50
        # Best of several timed rounds: a peak, not an average that a busy moment drags down
        # (one 3-rep round on a shared 2-core VM read 197 and 380 GFLOP/s in two runs).
        for _ in range(8):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(reps):
                a @ b
            if device == "cuda":
                torch.cuda.synchronize()
            best = max(best, 2 * n**3 * reps / (time.perf_counter() - t))
    return best


def train_flops_per_token(cfg, seq: int) -> float:
    """The usual 6N + attention estimate of training FLOPs per token (MFU convention).

    Qwen3.5: softmax attention on its full-attention layers only; a Gated DeltaNet layer adds
    the chunked delta rule's matmuls, per token and value head about 2 * 3 * (2 C Dk + C Dv +
    C (Dk + Dv) / 2 + 3 Dk Dv) with C = 64 (q k^T and k k^T, the intra-chunk product, the
    triangular solve, the state read / write), forward + backward.
    """
    # (getattr: ablation.py runs this worker against revisions whose config predates MoE / Qwen3.5)
    n = getattr(cfg, "num_active_parameters", cfg.num_parameters)()  # an MoE token passes through its top-k experts only
    layer_type = getattr(cfg, "layer_type", lambda i: "full_attention")
    n_full = sum(layer_type(i) == "full_attention" for i in range(cfg.num_hidden_layers))
    attn = 12 * n_full * cfg.num_attention_heads * cfg.head_dim * seq / 2  # causal
    linear = 0.0
    if getattr(cfg, "is_qwen35", False):
        c, dk, dv = 64, cfg.linear_key_head_dim, cfg.linear_value_head_dim
        per_head = 6 * (2 * c * dk + c * dv + c * (dk + dv) / 2 + 3 * dk * dv)
        linear = (cfg.num_hidden_layers - n_full) * cfg.linear_num_value_heads * per_head
    return 6 * n + attn + linear


# ---------------------------------------------------------------------------- workers
def nf4_quantizer():
    """load()'s NF4 argument: the quantizer object; revisions before it was a parameter (run by
    ablation.py --revs) took the name "nf4"."""
    from models.qwen import checkpoint

    if hasattr(checkpoint, "register_quantizer"):
        return "nf4"
    import quant

    return quant.NF4Quantizer()


def run_ours(args, path: Path):
    import lora
    import train
    from models.qwen import load

    model = load(path, dtype=torch.bfloat16, device=args.device, quantize=nf4_quantizer() if args.mode == "qlora" else None)
    lora.inject(model, r=16, alpha=16, dropout=0.0, targets="all-linear")
    model.enable_gradient_checkpointing(True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = train.AdamW(params, lr=1e-4, weight_decay=0.0)

    def step(ids):
        loss = model(ids, labels=ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return model.config, step


def run_hf(args, path: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    kwargs = {}
    if args.mode == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map=args.device, **kwargs)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    targets = "all-linear"
    if getattr(model.config, "num_experts", 0):  # see the module docstring
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=targets,
                                             task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)

    def step(ids):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    from models.qwen import QwenConfig

    return QwenConfig.from_hf(path), step


def worker(args) -> None:
    if args.lib:  # another checkout of this library (benchmarks/ablation.py: before/after a commit)
        sys.path.insert(0, args.lib)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    path = Path(args.path)
    cfg, step = (run_ours if args.worker == "ours" else run_hf)(args, path)
    data = batches(args, cfg.vocab_size)
    losses, times, cpu_times = [], [], []
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for ids in data:
        ids = ids.to(args.device)
        t, cpu = time.perf_counter(), time.process_time()
        loss = step(ids)
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - cpu)
        losses.append(float(loss))
    # The median step, not the mean: on a shared VM a single step can take 1.5x longer than its
    # neighbours (host noise), and the median keeps one such hiccup from deciding a ratio.
    tokens_per_s = args.batch * args.seq / statistics.median(times[args.warmup :])
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    tokens_per_cpu_s = args.batch * args.seq / statistics.median(cpu_times[args.warmup :])
    flops = train_flops_per_token(cfg, args.seq) * tokens_per_s
    print(json.dumps(dict(side=args.worker, tokens_per_s=tokens_per_s, tokens_per_cpu_s=tokens_per_cpu_s,
                          peak_mib=peak, losses=losses, step_s=times, flops=flops)))


def run_worker(cmd: list[str], label: str) -> dict:
    """Run one worker process; the JSON objects it printed, one per line, merged into one dict (a
    later key wins). Exits with the worker's stderr on failure."""
    out = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        sys.exit(f"{label} worker failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return {k: v for line in lines for k, v in json.loads(line).items()}


def print_every_run(runs: dict[str, list[dict]], device: str) -> None:
    """tokens/s (and on the CPU tokens per CPU-second) of each run of each side, in run order."""
    for side, side_runs in runs.items():
        print(f"tokens/s of every {side} run:", " ".join(f"{d['tokens_per_s']:.1f}" for d in side_runs))
        if device == "cpu":
            print(f"tokens/CPU-s of every {side} run:", " ".join(f"{d['tokens_per_cpu_s']:.1f}" for d in side_runs))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="bench-100m",
                   help="a shape of benchmarks/shapes.py (bench-100m, bench-moe, qwen3.5-bench) or a QwenConfig "
                        "preset (0.5b, 1.5b, 7b, qwen3-30b-a3b, ...)")
    p.add_argument("--mode", choices=["lora", "qlora"], default="lora")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per side")
    p.add_argument("--repeats", type=int, default=2,
                   help="worker runs per side, interleaved ours/hf/ours/hf; the best run of each side counts")
    p.add_argument("--warmup", type=int, default=1, help="steps left out of the timing")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--cache", default=os.environ.get("QWEN_TUNE_CACHE", str(Path.home() / ".cache" / "qwen-tune")))
    p.add_argument("--worker", choices=["ours", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--lib", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    path = checkpoint_dir(args.shape, Path(args.cache))
    runs: dict[str, list[dict]] = {"ours": [], "hf": []}
    for _ in range(args.repeats):
        for side in ("ours", "hf"):
            cmd = [sys.executable, __file__, "--worker", side, "--path", str(path)] + [
                f"--{k}={v}" for k, v in vars(args).items()
                if k in ("mode", "device", "batch", "seq", "steps", "warmup", "threads")
            ]
            runs[side].append(run_worker(cmd, side))
    results = {side: max(r, key=lambda d: d["tokens_per_s"]) for side, r in runs.items()}
    peak = matmul_peak(args.device)
    ours, hf = results["ours"], results["hf"]
    unit = "peak MiB (" + ("cuda allocated" if args.device == "cuda" else "RSS") + ")"
    print(f"\n{args.mode} | {args.shape} | {args.device} | batch {args.batch} x {args.seq} | {args.steps} steps "
          f"({args.warmup} warm-up) | threads {args.threads} | best of {args.repeats} runs per side")
    print(f"{'':14}{'ours':>14}{'hf+peft':>14}{'ratio':>10}")
    print(f"{'tokens/s':14}{ours['tokens_per_s']:14.1f}{hf['tokens_per_s']:14.1f}{ours['tokens_per_s'] / hf['tokens_per_s']:10.2f}")
    if args.device == "cpu":
        cpu = {side: max(d["tokens_per_cpu_s"] for d in r) for side, r in runs.items()}
        print(f"{'tokens/CPU-s':14}{cpu['ours']:14.1f}{cpu['hf']:14.1f}{cpu['ours'] / cpu['hf']:10.2f}")
    print(f"{unit[:14]:14}{ours['peak_mib']:14.0f}{hf['peak_mib']:14.0f}{ours['peak_mib'] / hf['peak_mib']:10.2f}")
    print(f"{'final loss':14}{ours['losses'][-1]:14.4f}{hf['losses'][-1]:14.4f}{ours['losses'][-1] - hf['losses'][-1]:10.4f}")
    print(f"{'MFU':14}{ours['flops'] / peak:14.1%}{hf['flops'] / peak:14.1%}")
    print(f"matmul peak measured: {peak / 1e9:.0f} GFLOP/s; {unit}")
    print("losses ours:", " ".join(f"{x:.4f}" for x in ours["losses"]))
    print("losses hf:  ", " ".join(f"{x:.4f}" for x in hf["losses"]))
    print_every_run(runs, args.device)
    typical = {side: statistics.median(d["tokens_per_s"] for d in r) for side, r in runs.items()}
    print(f"median run: ours {typical['ours']:.1f}, hf {typical['hf']:.1f} tokens/s, "
          f"ratio {typical['ours'] / typical['hf']:.2f}")


if __name__ == "__main__":
    main()
