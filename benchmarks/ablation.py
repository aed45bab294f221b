"""Before/after figures for optimisations that landed as commits: our training step at
several revisions of this library, same machine, same run, interleaved.

    python benchmarks/ablation.py --revs c28b6bb 39dca25 5518094 HEAD --mode lora
    python benchmarks/ablation.py --revs 5518094 HEAD --mode qlora

Each revision is checked out once into a temporary git worktree; the worker of
benchmarks/vs_hf.py (this file's copy, so the timing rule is the same for every revision)
imports the library from that worktree and trains the bench shape for --steps steps. The
revisions run round-robin --repeats times and the best run of each counts (host noise on a
shared VM hits all revisions alike). Prints tokens/s, peak RSS and the final loss per revision.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))


def worktree(rev: str, base: Path) -> Path:
    """A detached checkout of `rev` under `base` (HEAD: this working tree itself)."""
    if rev == "HEAD":
        return ROOT
    path = base / rev
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), rev],
                   check=True, capture_output=True)
    return path


def main() -> None:
    from vs_hf import checkpoint_dir, run_worker

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--revs", nargs="+", required=True, help="git revisions, oldest first (HEAD = the working tree)")
    p.add_argument("--mode", choices=["lora", "qlora"], default="lora")
    p.add_argument("--shape", default="bench-100m")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--cache", default=os.environ.get("QWEN_TUNE_CACHE", str(Path.home() / ".cache" / "qwen-tune")))
    args = p.parse_args()

    path = checkpoint_dir(args.shape, Path(args.cache))
    runs: dict[str, list[dict]] = {rev: [] for rev in args.revs}
    with tempfile.TemporaryDirectory(prefix="ablation-") as tmp:
        trees = {rev: worktree(rev, Path(tmp)) for rev in args.revs}
        try:
            for _ in range(args.repeats):
                for rev, tree in trees.items():
                    cmd = [sys.executable, str(ROOT / "benchmarks" / "vs_hf.py"), "--worker", "ours", "--path", str(path),
                           "--lib", str(tree), f"--mode={args.mode}", "--device=cpu", f"--batch={args.batch}",
                           f"--seq={args.seq}", f"--steps={args.steps}", "--warmup=1", f"--threads={args.threads}"]
                    runs[rev].append(run_worker(cmd, rev))
        finally:
            for rev, tree in trees.items():
                if tree != ROOT:
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
    print(f"\nours only | {args.mode} | {args.shape} | batch {args.batch} x {args.seq} | {args.steps} steps | "
          f"best of {args.repeats} runs per revision")
    print(f"{'revision':12}{'tokens/s':>10}{'vs first':>10}{'tokens/CPU-s':>14}{'vs first':>10}{'peak RSS MiB':>14}"
          f"{'final loss':>12}   all runs (tokens/s)")
    first = first_cpu = None
    for rev in args.revs:
        best = max(runs[rev], key=lambda d: d["tokens_per_s"])
        cpu = max(d["tokens_per_cpu_s"] for d in runs[rev])   # process time: what waiting for a busy core does not count
        first, first_cpu = first or best["tokens_per_s"], first_cpu or cpu
        every = " ".join(f"{d['tokens_per_s']:.0f}" for d in runs[rev])
        print(f"{rev:12}{best['tokens_per_s']:10.1f}{best['tokens_per_s'] / first:10.2f}{cpu:14.1f}{cpu / first_cpu:10.2f}"
              f"{best['peak_mib']:14.0f}{best['losses'][-1]:12.4f}   {every}")


if __name__ == "__main__":
    main()
