"""Long context at a fixed memory budget: the longest sequence for which one LoRA step completes
under a peak-RSS budget (default 6 GiB), ours vs transformers + PEFT with gradient checkpointing.

    python benchmarks/long_context.py                          # both sides, 100M shape, 6 GiB
    python benchmarks/long_context.py --sides ours --start 65536 --max-attempts 3
    python benchmarks/long_context.py --lengths 1024 2048 4096 8192 --sides ours hf   # fixed points
    PYTHONPATH=/path/to/matplotlib python benchmarks/long_context.py --plot-only   # redraw the PNG

Each attempt is one subprocess (a fresh process: its peak RSS is its own, loading included) that
loads the bench checkpoint (benchmarks/vs_hf.py writes it once, the real 151936-row vocabulary),
adds LoRA r=16 on all linears, turns on gradient checkpointing and runs one optimizer step on one
sequence of T random tokens (labels = inputs). The parent samples the child's RSS and kills it
once it passes the budget (so a failing attempt never takes the shared machine's memory), and the
child's own ru_maxrss is the peak reported for a completed step.

The search: doubling from --start (default: the length the memory model of train/memory.py
predicts for ours, rounded down to a power of two; 1024 for transformers) until an attempt fails,
then bisecting between the last success and the first failure to a multiple of 1024 tokens, at
most --max-attempts attempts per side. Every attempt is appended to --record (JSON lines), which
the plot reads: peak RSS against length for both sides, with the memory model's prediction for
ours (benchmarks/long_context.png).

The plot needs matplotlib, which the library does not: `pip install --target DIR matplotlib` and
PYTHONPATH=DIR for this script (it is imported only when the PNG is drawn).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

GIB = 2**30


def rss_bytes(pid: int) -> int:
    """Resident set size of process `pid` in bytes (0 once it has gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# ---------------------------------------------------------------------------- workers
def step_ours(args, path: Path):
    import lora
    import train
    from models.qwen import load

    model = load(path, dtype=torch.bfloat16)
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


def step_hf(args, path: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from models.qwen import QwenConfig

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
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

    return QwenConfig.from_hf(path), step


def worker(args) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cfg, step = (step_ours if args.worker == "ours" else step_hf)(args, Path(args.path))
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, min(cfg.vocab_size, 151643), (1, args.seq), generator=g)
    t = time.perf_counter()
    loss = float(step(ids))
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps(dict(side=args.worker, seq=args.seq, ok=True, peak_bytes=peak, loaded_bytes=loaded,
                          loss=loss, step_s=seconds)), flush=True)


def attempt(args, side: str, path: Path, seq: int) -> dict:
    """One step of `side` at `seq` tokens in a subprocess, killed past the budget."""
    cmd = [sys.executable, __file__, "--worker", side, "--path", str(path), f"--seq={seq}", f"--threads={args.threads}"]
    budget = int(args.budget_gib * GIB)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    high, killed = 0, False
    while proc.poll() is None:
        high = max(high, rss_bytes(proc.pid))
        if high > budget:
            proc.kill()
            killed = True
            break
        time.sleep(0.05)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if killed or proc.returncode != 0 or not lines:
        why = "over budget (killed)" if killed else f"exit {proc.returncode}: {err.strip().splitlines()[-1:] }"
        return dict(side=side, seq=seq, ok=False, peak_bytes=high, why=why, wall_s=wall)
    result = json.loads(lines[-1])
    result["ok"] = result["peak_bytes"] <= budget
    result["wall_s"] = wall
    return result


def predicted_start(cfg, budget: float) -> int:
    """The longest power of two the memory model predicts fits (ours), at least 1024."""
    from train.memory import MemoryOptions, predict_peak_bytes

    opts = MemoryOptions(lora_rank=16, checkpointing=True, dtype=torch.bfloat16)
    seq = 1024
    while predict_peak_bytes(cfg, 2 * seq, opts) < budget:
        seq *= 2
    return seq


def search(args, side: str, path: Path, start: int, record: Path) -> tuple[int, int | None]:
    """Doubling from `start`, then bisection; (longest success, shortest failure)."""
    good, bad = 0, None
    seq, n = start, 0
    while n < args.max_attempts:
        r = attempt(args, side, path, seq)
        n += 1
        with open(record, "a") as f:
            f.write(json.dumps(r) + "\n")
        print(f"  {side:5} T={seq:7}: {'ok  ' if r['ok'] else 'FAIL'} peak {r['peak_bytes'] / GIB:.2f} GiB "
              f"({r.get('why') or 'step %.0fs' % r.get('step_s', 0)})", flush=True)
        if r["ok"]:
            good = max(good, seq)
        else:
            bad = seq if bad is None else min(bad, seq)
        if bad is None:
            seq *= 2
        else:
            if good == 0 and bad <= 1024:
                break
            lo = good if good else bad // 2
            nxt = (lo + bad) // 2 // 1024 * 1024
            if nxt <= lo or nxt >= bad:
                if good == 0:
                    seq = max(1024, bad // 2)
                    if seq == bad:
                        break
                    continue
                break
            seq = nxt
    return good, bad


def plot(record: Path, png: Path, cfg, budget_gib: float) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("the plot needs matplotlib: pip install --target DIR matplotlib, then PYTHONPATH=DIR "
                 "python benchmarks/long_context.py --plot-only")
    from train.memory import MemoryOptions, predict_peak_bytes

    rows = [json.loads(line) for line in record.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for side, colour, label in (("ours", "tab:blue", "qwen-tune"), ("hf", "tab:red", "transformers + PEFT")):
        pts = sorted((r["seq"], r["peak_bytes"] / GIB, r["ok"]) for r in rows if r["side"] == side)
        if not pts:
            continue
        ok = [(s, p) for s, p, o in pts if o]
        fail = [(s, p) for s, p, o in pts if not o]
        if ok:
            ax.plot(*zip(*ok), "o-", color=colour, label=f"{label}: completed (peak RSS)")
        if fail:
            ax.plot(*zip(*fail), "x", color=colour, markersize=9, label=f"{label}: over budget (RSS when killed)")
    lengths = sorted({r["seq"] for r in rows} | {2**k for k in range(10, 18)})
    opts = MemoryOptions(lora_rank=16, checkpointing=True, dtype=torch.bfloat16)
    ax.plot(lengths, [predict_peak_bytes(cfg, t, opts) / GIB for t in lengths], "--", color="tab:blue",
            alpha=0.6, label="memory model (train/memory.py), ours")
    ax.axhline(budget_gib, color="grey", linestyle=":", label=f"budget {budget_gib:g} GiB")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (tokens, batch 1)")
    ax.set_ylabel("peak RSS of one LoRA step (GiB)")
    ax.set_title("bench-100m (vocab 151936), LoRA r=16, gradient checkpointing, bf16, CPU")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="bench-100m")
    p.add_argument("--budget-gib", type=float, default=6.0)
    p.add_argument("--sides", nargs="+", choices=["ours", "hf"], default=["ours", "hf"])
    p.add_argument("--start", type=int, help="first length tried (default: memory model for ours, 1024 for hf)")
    p.add_argument("--lengths", type=int, nargs="+", help="measure exactly these lengths instead of searching")
    p.add_argument("--max-attempts", type=int, default=6, help="attempts per side (doubling + bisection)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--record", default=str(ROOT / "benchmarks" / "long_context.jsonl"))
    p.add_argument("--png", default=str(ROOT / "benchmarks" / "long_context.png"))
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--plot-only", action="store_true")
    p.add_argument("--cache", default=os.environ.get("QWEN_TUNE_CACHE", str(Path.home() / ".cache" / "qwen-tune")))
    p.add_argument("--worker", choices=["ours", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    from shapes import bench_config

    cfg = bench_config(args.shape)
    record = Path(args.record)
    if not args.plot_only:
        from vs_hf import checkpoint_dir

        path = checkpoint_dir(args.shape, Path(args.cache))
        for side in args.sides:
            if args.lengths:
                for seq in args.lengths:
                    r = attempt(args, side, path, seq)
                    with open(record, "a") as f:
                        f.write(json.dumps(r) + "\n")
                    print(f"  {side:5} T={seq:7}: {'ok  ' if r['ok'] else 'FAIL'} peak {r['peak_bytes'] / GIB:.2f} GiB",
                          flush=True)
                continue
            start = args.start or (predicted_start(cfg, args.budget_gib * GIB) if side == "ours" else 1024)
            good, bad = search(args, side, path, start, record)
            print(f"{side}: longest completed {good} tokens under {args.budget_gib:g} GiB"
                  + (f" (first failure {bad})" if bad else ""), flush=True)
    if not args.no_plot:
        plot(record, Path(args.png), cfg, args.budget_gib)


if __name__ == "__main__":
    main()
