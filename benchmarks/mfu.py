"""Model FLOPs utilisation of one dense training step against this machine's measured GEMM peak,
both measured in the same run, and where the rest of the step's time goes.

    python benchmarks/mfu.py                              # CPU: bench-100m, LoRA and full, bf16
    python benchmarks/mfu.py --modes lora --steps 4       # one mode
    python benchmarks/mfu.py --device cuda --shape 0.5b --seq 2048 --batch 4
    python benchmarks/mfu.py --peak-only                  # the GEMM table alone

Three parts, printed in this order:

1. The peak: torch.matmul / F.linear on large square problems and on the step's own GEMM shapes
   (the projections' forward, input-gradient and weight-gradient products, the chunked head's
   two products, LoRA's rank-r products), in bf16 and fp32, best of --reps timed calls each, with
   the thread count training uses. The peak is the best bf16 rate of the table. On the CPU it
   also says which kernel oneDNN picks for a bf16 matmul (ONEDNN_VERBOSE in a child process:
   `brg_matmul:avx512_core_bf16` is the AVX512-BF16 kernel, `..._amx` the AMX one).
2. The step: vs_hf.py's model and settings (random bf16 weights of --shape, LoRA r=16 all-linear
   or full fine-tuning, gradient checkpointing on, train.AdamW), median of --steps timed steps
   after --warmup; its model FLOPs (`step_flops`, formula below); MFU = FLOPs / step time / peak.
   HFU counts the checkpointing's recomputed forward too. On the CPU each GEMM and each step is
   also timed in process CPU time, and "MFU (CPU time)" divides the two: with --threads 1 that is
   the figure of an idle core even on a shared host (a descheduled thread's wait is not counted;
   shared caches and memory bandwidth still are), the number to compare across runs there.
3. The gap: one more step under torch.profiler, each op's self time put in one category (GEMMs
   of the blocks, LoRA's GEMMs, attention, copies and casts, other elementwise work, the head's
   GEMMs, the loss's softmax passes, the optimizer) with each GEMM category's FLOPs and rate;
   what no op accounts for is Python and autograd overhead.

Model FLOPs of one step (`step_flops`; T = batch x seq tokens, T_h = batch x (seq - 1) scored
positions, L layers, N_blk = the weights of one block's seven projections, d hidden, V vocab,
h query heads of size d_h, r LoRA rank, c = 1/2 for causal attention):

- a projection W [d_in, d_out] costs 2 T d_in d_out for its forward product, as much for the
  gradient of its input, and as much for the gradient of its weight;
- full:  6 L N_blk T  +  6 T_h V d (head: logits, hidden gradient, weight gradient)  +  attention;
- LoRA:  4 L N_blk T  -  2 T N_qkv  (no weight gradient for the frozen base; layer 0's q/k/v read
  the frozen embeddings, so nothing needs their input gradient: N_qkv = its q, k, v weights)
  +  6 T r Sum(d_in + d_out) over the L x 7 adapters  -  2 T r Sum_qkv d_in  (x.A and (x.A).B
  forward; B's gradient, the gradient of x.A, A's gradient, x's gradient; layer 0's q/k/v
  skip x's)  +  4 T_h V d (the head: logits and hidden gradient, frozen weight)  +  attention;
- attention: 4 B seq^2 h d_h c per layer forward (q.k^T and p.v), twice that backward (dp, dv,
  dq, dk): 12 c L B seq^2 h d_h in all, the same in both modes;
- recompute (HFU only): gradient checkpointing runs each block's forward again in backward:
  + 2 L N_blk T + 2 T r Sum(d_in + d_out) + 4 c L B seq^2 h d_h.

Norms, RoPE, SwiGLU, softmax and the optimizer count as zero (the MFU convention: matmul FLOPs
only); biases too. tests/benchmarks/test_mfu_flops.py checks the formula, with c = 1, against
torch.utils.flop_counter.FlopCounterMode over our forward and backward on a tiny shape.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

MODES = ("lora", "full")
ADAPTED = ("q", "k", "v", "o", "gate", "up", "down")  # "all-linear": the seven projections of a block


# ---------------------------------------------------------------------------- the FLOP formula
def projections(cfg) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each projection of one dense block."""
    d, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "gate": (d, i), "up": (d, i), "down": (i, d)}


def step_flops(cfg, batch: int, seq: int, mode: str, r: int = 16, causal: bool = True) -> dict[str, float]:
    """Matmul FLOPs of one forward + backward of a dense Qwen block stack + chunked head (module
    docstring): {"blocks", "adapters", "head", "attention", "model" (their sum), "recompute",
    "hardware" (model + recompute)}. Dense shapes only (no MoE, no linear attention)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if getattr(cfg, "num_experts", 0) or getattr(cfg, "is_qwen35", False):
        raise ValueError("step_flops counts dense blocks only (vs_hf.train_flops_per_token estimates the others)")
    L, d, V = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
    T, T_h = batch * seq, batch * (seq - 1)
    proj = projections(cfg)
    n_blk = sum(a * b for a, b in proj.values())
    n_qkv = sum(proj[p][0] * proj[p][1] for p in ("q", "k", "v"))
    c = 0.5 if causal else 1.0
    attn_fwd = 4 * c * L * batch * seq**2 * cfg.num_attention_heads * cfg.head_dim
    out = {"attention": 3 * attn_fwd}
    if mode == "full":
        out.update(blocks=6 * L * n_blk * T, adapters=0.0, head=6 * T_h * V * d)
        adapter_fwd = 0.0
    else:
        span = sum(a + b for a, b in proj.values())
        adapter_fwd = 2 * T * r * span * L
        out.update(blocks=4 * L * n_blk * T - 2 * T * n_qkv,
                   adapters=3 * adapter_fwd - 2 * T * r * sum(proj[p][0] for p in ("q", "k", "v")),
                   head=4 * T_h * V * d)
    out["model"] = out["blocks"] + out["adapters"] + out["head"] + out["attention"]
    out["recompute"] = 2 * L * n_blk * T + adapter_fwd + attn_fwd
    out["hardware"] = out["model"] + out["recompute"]
    return out


# ---------------------------------------------------------------------------- peak GEMM rate
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_gemm(fn, flops: float, device: str, reps: int, budget_s: float = 2.0, cpu: bool = False):
    """Best FLOP/s of `reps` timed rounds of fn() (a round repeats fn until it takes >= 5 ms).
    cpu=True: (best wall rate, best rate per CPU-second of this process), see `main`'s --threads note."""
    fn()
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    once = max(time.perf_counter() - t, 1e-6)
    inner = max(1, int(0.005 / once))
    best, best_cpu, spent = 0.0, 0.0, 0.0
    for _ in range(reps):
        _sync(device)
        t, c = time.perf_counter(), time.process_time()
        for _ in range(inner):
            fn()
        _sync(device)
        dt, dc = time.perf_counter() - t, time.process_time() - c
        spent += dt
        best = max(best, flops * inner / dt)
        best_cpu = max(best_cpu, flops * inner / max(dc, 1e-6))
        if spent > budget_s:
            break
    return (best, best_cpu) if cpu else best


def gemm_cases(cfg, batch: int, seq: int, r: int) -> list[tuple[str, int, int, int, str]]:
    """(label, m, k, n, kind) of the step's GEMMs; kind: "linear" (x [m,k] . W[n,k]^T, F.linear),
    "mm" (a [m,k] . b [k,n], both contiguous), "tn" (a^T with a [k,m] contiguous: weight gradients)."""
    from models.qwen.loss import CHUNK_ELEMENTS

    T, d, V = batch * seq, cfg.hidden_size, cfg.vocab_size
    chunk = min(max(1, CHUNK_ELEMENTS // V), batch * (seq - 1))
    cases, seen = [], set()
    for name, (din, dout) in projections(cfg).items():
        if (din, dout) in seen:
            continue
        seen.add((din, dout))
        cases += [(f"{name} fwd", T, din, dout, "linear"), (f"{name} grad x", T, dout, din, "mm"),
                  (f"{name} grad W", dout, T, din, "tn")]
    cases += [(f"head fwd ({chunk} rows)", chunk, d, V, "linear"), ("head grad h", chunk, V, d, "mm"),
              ("head grad W", V, chunk, d, "tn"),
              # the same head product with 1024 rows per chunk: what a larger chunk (more memory) would buy
              ("head fwd (1024 rows)", 1024, d, V, "linear"), ("head grad h (1024 rows)", 1024, V, d, "mm"),
              (f"LoRA x.A (r={r})", T, d, r, "linear"), ("LoRA (x.A).B", T, r, cfg.intermediate_size, "linear")]
    return cases


def peak_table(cfg, batch: int, seq: int, r: int, device: str, reps: int, squares=(2048, 4096)):
    """Rows (label, shape, {dtype: FLOP/s}) and the best bf16 rate."""
    rows = []
    for n in squares:
        rows.append((f"square {n}", (n, n, n), "mm"))
    rows += [(label, (m, k, n), kind) for label, m, k, n, kind in gemm_cases(cfg, batch, seq, r)]
    out, peak, peak_cpu = [], 0.0, 0.0
    for label, (m, k, n), kind in rows:
        rates = {}
        for dtype in (torch.bfloat16, torch.float32):
            g = torch.Generator(device=device).manual_seed(0)
            if kind == "linear":
                a = torch.randn(m, k, device=device, dtype=dtype, generator=g)
                b = torch.randn(n, k, device=device, dtype=dtype, generator=g)
                fn = lambda a=a, b=b: F.linear(a, b)  # noqa: E731
            elif kind == "tn":
                a = torch.randn(k, m, device=device, dtype=dtype, generator=g)
                b = torch.randn(k, n, device=device, dtype=dtype, generator=g)
                fn = lambda a=a, b=b: a.t() @ b  # noqa: E731
            else:
                a = torch.randn(m, k, device=device, dtype=dtype, generator=g)
                b = torch.randn(k, n, device=device, dtype=dtype, generator=g)
                fn = lambda a=a, b=b: a @ b  # noqa: E731
            rates[dtype], rates[(dtype, "cpu")] = time_gemm(fn, 2.0 * m * k * n, device, reps, cpu=True)
            del a, b
        peak = max(peak, rates[torch.bfloat16])
        peak_cpu = max(peak_cpu, rates[(torch.bfloat16, "cpu")])
        out.append((label, (m, k, n), rates))
    return out, peak, peak_cpu


def onednn_kernel() -> str:
    """The oneDNN kernel torch picks for a CPU bf16 matmul (from ONEDNN_VERBOSE in a child)."""
    code = ("import torch; a = torch.randn(256, 512, dtype=torch.bfloat16); "
            "w = torch.randn(512, 512, dtype=torch.bfloat16); torch.nn.functional.linear(a, w); a @ w")
    env = dict(os.environ, ONEDNN_VERBOSE="1")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    kernels = sorted({m.group(1) for m in re.finditer(r",exec,cpu,matmul,([^,]+),", run.stdout)})
    if not kernels:
        return "no oneDNN matmul ran for bf16 (torch's own CPU GEMM: no bf16 instructions)"
    return ", ".join(kernels)


# ---------------------------------------------------------------------------- the training step
def build_step(args, path: Path, mode: str):
    """vs_hf.run_ours's step (LoRA), or the same model trained in full; returns (cfg, model, step)."""
    import lora
    import train
    from models.qwen import load

    model = load(path, dtype=torch.bfloat16, device=args.device)
    if mode == "lora":
        lora.inject(model, r=args.r, alpha=args.r, dropout=0.0, targets="all-linear")
    model.enable_gradient_checkpointing(True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = train.AdamW(params, lr=1e-4, weight_decay=0.0)
    # Labels for the profiler's categories (benchmark-only wrappers; the library has no such hooks).
    loss_from_hidden = model.loss_from_hidden

    def labelled_loss(*a, **k):
        with torch.profiler.record_function("mfu.head_loss"):
            return loss_from_hidden(*a, **k)

    model.loss_from_hidden = labelled_loss

    def step(ids):
        with torch.profiler.record_function("mfu.forward"):
            loss = model(ids, labels=ids)
        with torch.profiler.record_function("mfu.backward"):
            loss.backward()
        with torch.profiler.record_function("mfu.optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss

    return model.config, model, step


GEMM_OPS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm"}
ATTENTION = re.compile(r"scaled_dot_product|flash_attention|efficient_attention")
COPIES = {"aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous", "aten::empty_like",
          "aten::fill_", "aten::zero_", "aten::zeros", "aten::empty", "aten::empty_strided", "aten::cat",
          "aten::index_select", "aten::repeat_interleave"}


def gemm_flops(name: str, shapes) -> float:
    """FLOPs of one GEMM event from its recorded input shapes (0 when they are not known)."""
    try:
        if name in ("aten::mm",):
            (m, k), (_, n) = shapes[0], shapes[1]
            return 2.0 * m * k * n
        if name in ("aten::addmm", "aten::addmm_"):
            (m, k), (_, n) = shapes[1], shapes[2]
            return 2.0 * m * k * n
        if name in ("aten::bmm", "aten::baddbmm"):
            a, b = (shapes[0], shapes[1]) if name == "aten::bmm" else (shapes[1], shapes[2])
            return 2.0 * a[0] * a[1] * a[2] * b[2]
    except (IndexError, ValueError, TypeError):
        pass
    return 0.0


def _region(event) -> str:
    """The mfu.* label of the innermost labelled range around an event ("" when none)."""
    e = event.cpu_parent
    while e is not None:
        if e.name.startswith("mfu."):
            return e.name
        e = e.cpu_parent
    return ""


def breakdown(prof, cfg, r: int) -> tuple[dict[str, list[float]], dict[str, dict[str, list[float]]]]:
    """({category: [self ms, FLOPs]}, {category: {op and shapes: [self ms, FLOPs, calls]}}) over the
    profiled step (module docstring, part 3)."""
    V = cfg.vocab_size
    cats: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    ops: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0.0, 0]))
    for e in prof.events():
        if e.name.startswith("mfu.") or e.device_type != torch.autograd.DeviceType.CPU:
            continue
        region = _region(e)
        ms = e.self_cpu_time_total / 1e3
        name = e.name
        shapes = e.input_shapes or []
        if region == "mfu.optimizer":
            cat = "optimizer (AdamW, zero_grad)"
        elif name in GEMM_OPS:
            dims = {x for s in shapes if s for x in s}
            if region == "mfu.head_loss" or V in dims:
                cat = "GEMM: head"
            elif r in dims:
                cat = "GEMM: LoRA (fp32)"
            else:
                cat = "GEMM: block projections"
            fl = gemm_flops(name, shapes)
            cats[cat][1] += fl
            key = f"{name} {[list(x) for x in shapes if x]}"
            ops[cat][key][1] += fl
        elif ATTENTION.search(name):
            cat = "attention (SDPA fwd, recompute, bwd)"
        elif region == "mfu.head_loss":
            cat = "loss: softmax, casts (head chunks)"
        elif name in COPIES:
            cat = "copies, casts, allocation"
        else:
            cat = "elementwise: norm, RoPE, SwiGLU, residual"
        cats[cat][0] += ms
        key = key if name in GEMM_OPS and region != "mfu.optimizer" else name
        ops[cat][key][0] += ms
        ops[cat][key][2] += 1
    return cats, ops


def run_mode(args, path: Path, mode: str, peak: float) -> dict:
    from torch.profiler import ProfilerActivity, profile
    import vs_hf

    torch.manual_seed(0)
    cfg, model, step = build_step(args, path, mode)
    data = vs_hf.batches(argparse.Namespace(batch=args.batch, seq=args.seq, steps=args.warmup + args.steps + 1),
                         cfg.vocab_size)
    data = [x.to(args.device) for x in data]
    times, cpu_times = [], []
    for i, ids in enumerate(data[:-1]):
        _sync(args.device)
        t, c = time.perf_counter(), time.process_time()
        step(ids)
        _sync(args.device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
            cpu_times.append(time.process_time() - c)
    step_s = statistics.median(times)
    flops = step_flops(cfg, args.batch, args.seq, mode, r=args.r)
    result = dict(mode=mode, step_s=step_s, times=times, cpu_s=statistics.median(cpu_times), flops=flops, mfu=flops["model"] / step_s / peak,
                  hfu=flops["hardware"] / step_s / peak)
    if args.device == "cpu" and not args.no_profile:
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            t = time.perf_counter()
            step(data[-1])
            result["profiled_s"] = time.perf_counter() - t
        result["cats"], result["ops"] = breakdown(prof, cfg, args.r)
    del model, step
    return result


def report(res: dict, peak: float, args) -> None:
    f = res["flops"]
    mode = res["mode"]
    print(f"\n== {mode} | {args.shape} | {args.device} | batch {args.batch} x {args.seq} | bf16 weights"
          + (f", LoRA r={args.r} all-linear" if mode == "lora" else ", every weight trains (fp32 AdamW masters)")
          + f" | gradient checkpointing | threads {torch.get_num_threads()}")
    print("step s (median of {}): {:.3f}   every step: {}".format(
        len(res["times"]), res["step_s"], " ".join(f"{x:.3f}" for x in res["times"])))
    print("model FLOPs/step {:.1f} G (blocks {:.1f}, adapters {:.2f}, head {:.1f}, attention {:.2f}); "
          "+ recompute {:.1f} G = hardware {:.1f} G".format(
              f["model"] / 1e9, f["blocks"] / 1e9, f["adapters"] / 1e9, f["head"] / 1e9, f["attention"] / 1e9,
              f["recompute"] / 1e9, f["hardware"] / 1e9))
    print(f"achieved {f['model'] / res['step_s'] / 1e9:.1f} GFLOP/s of model FLOPs against the {peak / 1e9:.1f} GFLOP/s "
          f"bf16 peak:  MFU {res['mfu']:.1%}   (HFU, recompute counted: {res['hfu']:.1%})")
    if "cats" not in res:
        return
    cats = res["cats"]
    total = sum(v[0] for v in cats.values())
    wall = res["profiled_s"] * 1e3
    print(f"\nwhere one profiled step's {wall:.0f} ms go (op self time; the profiler adds its own overhead):")
    print(f"{'category':44}{'ms':>9}{'share':>8}{'GFLOP':>9}{'GFLOP/s':>10}{'of peak':>9}")
    for cat, (ms, fl) in sorted(cats.items(), key=lambda kv: -kv[1][0]):
        rate = fl / (ms / 1e3) if ms and fl else 0.0
        extra = f"{fl / 1e9:9.1f}{rate / 1e9:10.1f}{rate / peak:9.0%}" if fl else ""
        print(f"{cat:44}{ms:9.1f}{ms / wall:8.1%}{extra}")
    print(f"{'Python, autograd, profiler (wall - op time)':44}{wall - total:9.1f}{(wall - total) / wall:8.1%}")
    print(f"\nthe {args.top} largest ops of each category (self ms; GEMMs: FLOP rate; calls in the step):")
    for cat, (ms, _) in sorted(cats.items(), key=lambda kv: -kv[1][0]):
        print(f"  {cat}")
        for key, (op_ms, fl, calls) in sorted(res["ops"][cat].items(), key=lambda kv: -kv[1][0])[: args.top]:
            rate = f"{fl / (op_ms / 1e3) / 1e9:8.1f} GFLOP/s" if fl and op_ms else " " * 16
            print(f"    {op_ms:9.1f} ms {rate} {calls:6d}x  {key[:100]}")
    gemm_fl = sum(v[1] for v in cats.values())
    print(f"GEMM FLOPs the profiler saw: {gemm_fl / 1e9:.1f} G, the formula's hardware count {f['hardware'] / 1e9:.1f} G "
          f"(attention runs in SDPA's kernel, which the profiler does not count: {f['attention'] * 4 / 3 / 1e9:.1f} G "
          "with its recompute)")
    ideal = f["model"] / peak * 1e3
    print(f"at the peak rate the model FLOPs take {ideal:.0f} ms; the unprofiled step takes {res['step_s'] * 1e3:.0f} ms")


def main() -> None:
    import vs_hf
    from shapes import bench_config

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="bench-100m", help="a dense shape of benchmarks/shapes.py or a QwenConfig preset")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--r", type=int, default=16, help="LoRA rank")
    p.add_argument("--steps", type=int, default=5, help="timed steps per mode (median counts)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=8, help="timed rounds per GEMM shape (best counts)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--top", type=int, default=4, help="ops listed per category of the breakdown")
    p.add_argument("--peak-only", action="store_true")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--cache", default=os.environ.get("QWEN_TUNE_CACHE", str(Path.home() / ".cache" / "qwen-tune")))
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    cfg = bench_config(args.shape)
    dev = args.device
    print(f"torch {torch.__version__} | device {dev}"
          + (f" ({torch.cuda.get_device_name(0)})" if dev == "cuda" else
             f" | {torch.get_num_threads()} threads | CPU capability {torch.backends.cpu.get_cpu_capability()}"
             f" | avx512_bf16 {torch.cpu._is_avx512_bf16_supported()} | amx {torch.cpu._is_amx_tile_supported()}"))
    if dev == "cpu":
        print(f"oneDNN kernel for a bf16 matmul: {onednn_kernel()}; fp32 matmuls go to torch's BLAS (MKL)")
    elif dev == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    squares = (2048, 4096) if dev == "cpu" else (4096, 8192)
    rows, peak, peak_cpu = peak_table(cfg, args.batch, args.seq, args.r, dev, args.reps, squares)
    print(f"\nGEMM rates, best of {args.reps} (GFLOP/s; fp32 without TF32 on CUDA)")
    cpu_cols = dev == "cpu"
    print(f"{'GEMM':30}{'m x k x n':>22}{'bf16':>10}{'fp32':>10}"
          + (f"{'bf16/CPU-s':>12}{'fp32/CPU-s':>12}" if cpu_cols else ""))
    for label, (m, k, n), rates in rows:
        print(f"{label:30}{f'{m} x {k} x {n}':>22}{rates[torch.bfloat16] / 1e9:10.1f}{rates[torch.float32] / 1e9:10.1f}"
              + (f"{rates[(torch.bfloat16, 'cpu')] / 1e9:12.1f}{rates[(torch.float32, 'cpu')] / 1e9:12.1f}"
                 if cpu_cols else ""))
    print(f"peak bf16 GEMM rate (best of the table): {peak / 1e9:.1f} GFLOP/s"
          + (f"; per CPU-second of this process: {peak_cpu / 1e9:.1f} GFLOP/CPU-s" if cpu_cols else ""))
    if args.peak_only:
        return
    path = vs_hf.checkpoint_dir(args.shape, Path(args.cache))
    results = [run_mode(args, path, mode, peak) for mode in args.modes]
    for res in results:
        report(res, peak, args)
        if cpu_cols:
            # CPU time: what waiting for a busy core does not count. With --threads 1 this is the
            # idle machine's one-core figure whatever shares the host (cache and memory bandwidth
            # still shared); with more threads it also counts their spin-waits.
            f = res["flops"]["model"]
            print(f"per CPU-second: step {res['cpu_s']:.3f} CPU-s, {f / res['cpu_s'] / 1e9:.1f} GFLOP/CPU-s against "
                  f"{peak_cpu / 1e9:.1f}:  MFU (CPU time) {f / res['cpu_s'] / peak_cpu:.1%}")
    # The peak once more after the steps: how much the host's speed moved during the run.
    again = max(time_gemm(lambda: F.linear(a, b), 2.0 * m * k * n, dev, args.reps)
                for (m, k, n) in [rows[0][1]]
                for a, b in [(torch.randn(m, k, device=dev, dtype=torch.bfloat16),
                              torch.randn(n, k, device=dev, dtype=torch.bfloat16))])
    print(f"\n{rows[0][0]} bf16 again after the steps: {again / 1e9:.1f} GFLOP/s (before: "
          f"{rows[0][2][torch.bfloat16] / 1e9:.1f}); summary: " + ", ".join(
              f"{r['mode']} MFU {r['mfu']:.1%} (HFU {r['hfu']:.1%}"
              + (f", by CPU time {r['flops']['model'] / r['cpu_s'] / peak_cpu:.1%}" if cpu_cols else "") + ")"
              for r in results))


if __name__ == "__main__":
    main()
