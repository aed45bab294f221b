"""Where the time of one training step goes: torch.profiler over the step of benchmarks/vs_hf.py.

    python benchmarks/profile_step.py                       # ours, LoRA, the bench-100m shape
    python benchmarks/profile_step.py --side hf --mode qlora
    python benchmarks/profile_step.py --ops aten::mm aten::copy_ --rows 30

The same model, data and settings as vs_hf.py's worker (it reuses that code). After --warmup
untimed steps, --steps steps run plain (wall time, page faults, kernel time) and --steps more
under the profiler; printed per step: the ops with the most self time, then the listed --ops
split by input shape (which matmul, which copy).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

import vs_hf  # noqa: E402  (this folder)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", choices=["ours", "hf"], default="ours")
    p.add_argument("--mode", choices=["lora", "qlora"], default="lora")
    p.add_argument("--shape", default="bench-100m")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="profiled steps (figures are per step)")
    p.add_argument("--rows", type=int, default=25, help="ops listed by self time")
    p.add_argument("--ops", nargs="*", default=["aten::mm", "aten::addmm", "aten::copy_"],
                   help="ops to split by input shape")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--cache", default=os.environ.get("QWEN_TUNE_CACHE", str(Path.home() / ".cache" / "qwen-tune")))
    p.add_argument("--lib", help="profile another checkout of this library (a git worktree of an older commit)")
    args = p.parse_args()
    if args.lib:
        sys.path.insert(0, args.lib)
    args.device = "cpu"
    args.steps_total = args.warmup + 2 * args.steps

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    path = vs_hf.checkpoint_dir(args.shape, Path(args.cache))
    cfg, step = (vs_hf.run_ours if args.side == "ours" else vs_hf.run_hf)(args, path)
    data = vs_hf.batches(argparse.Namespace(batch=args.batch, seq=args.seq, steps=args.steps_total), cfg.vocab_size)
    for ids in data[: args.warmup]:
        step(ids)
    # Page faults and kernel time, measured on unprofiled steps: a fresh large tensor on CPU is
    # new memory from the OS, and first-touch faults are a cost the op timings hide.
    before, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for ids in data[args.warmup : args.warmup + args.steps]:
        step(ids)
    plain = (time.perf_counter() - t) / args.steps
    after = resource.getrusage(resource.RUSAGE_SELF)
    faults = (after.ru_minflt - before.ru_minflt) / args.steps
    kernel_s = (after.ru_stime - before.ru_stime) / args.steps
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t = time.perf_counter()
        for ids in data[args.warmup + args.steps :]:
            step(ids)
        wall = (time.perf_counter() - t) / args.steps
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e3 / args.steps
    print(f"{args.side} | {args.mode} | {args.shape} | batch {args.batch} x {args.seq} | {args.steps} profiled steps: "
          f"{wall:.2f} s wall per step (profiler on), {total:.0f} ms self CPU time per step (all threads' ops)")
    print(f"without the profiler: {plain:.2f} s per step, {faults:.0f} page faults and {kernel_s:.2f} s of kernel "
          f"time per step")
    print(f"\n{'op':58}{'calls/step':>11}{'ms/step':>10}{'share':>8}")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.rows]:
        ms = e.self_cpu_time_total / 1e3 / args.steps
        print(f"{e.key[:58]:58}{e.count / args.steps:11.0f}{ms:10.1f}{ms / total:8.1%}")
    shaped = [e for e in prof.key_averages(group_by_input_shape=True) if e.key in args.ops]
    if shaped:
        print(f"\n{'op':16}{'calls/step':>11}{'ms/step':>10}   input shapes")
        for e in sorted(shaped, key=lambda e: -e.self_cpu_time_total)[: args.rows]:
            print(f"{e.key:16}{e.count / args.steps:11.0f}{e.self_cpu_time_total / 1e3 / args.steps:10.1f}   "
                  f"{str(e.input_shapes)[:90]}")


if __name__ == "__main__":
    main()
