"""Before/after of one optimisation inside the whole training step, in one process.

    python benchmarks/step_ab.py lora-temporaries              # LoRA, the bench-100m shape
    python benchmarks/step_ab.py nf4-kernel --mode qlora --rounds 16

One model (vs_hf.py's worker setup: same checkpoint, settings and batch) trains step after
step, switching between the "before" and the "after" variant of one piece of the library at
every step (ABBA order, so neither side always runs first). On this project's shared VM the
host's speed drifts by 10-40% from one minute to the next; two separate runs cannot resolve a
3% change, steps taken seconds apart can. Reported: the median step of each variant and the
per-round ratios. The "before" code of each variant is written out in benchmarks/components.py
or switched off here, as the variant says.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import vs_hf  # noqa: E402  (this folder)


def lora_temporaries(before: bool) -> None:
    """LoRA update with fresh fp32 temporaries and a cast per adapter (before) or CPU scratch and
    one shared cast per input (after, lora/fused_update.py)."""
    import components
    import lora.fused_update

    if not hasattr(lora_temporaries, "after"):
        lora_temporaries.after = lora.fused_update._LoRAUpdate
    lora.fused_update._LoRAUpdate = components._FreshTemporariesUpdate if before else lora_temporaries.after


def nf4_kernel(before: bool) -> None:
    """NF4 dequantisation by our PyTorch codec (before) or bitsandbytes' CPU kernel (after)."""
    from quant import backend

    if not hasattr(nf4_kernel, "after"):
        nf4_kernel.after = backend.serves
    backend.serves = (lambda q: False) if before else nf4_kernel.after


VARIANTS = {"lora-temporaries": lora_temporaries, "nf4-kernel": nf4_kernel}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variant", choices=sorted(VARIANTS))
    p.add_argument("--mode", choices=["lora", "qlora"], default="lora")
    p.add_argument("--shape", default="bench-100m")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--rounds", type=int, default=12, help="rounds of one step per variant (after one warm-up round)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--cache", default=os.environ.get("QWEN_TUNE_CACHE", str(Path.home() / ".cache" / "qwen-tune")))
    args = p.parse_args()
    args.device = "cpu"

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    switch = VARIANTS[args.variant]
    path = vs_hf.checkpoint_dir(args.shape, Path(args.cache))
    cfg, step = vs_hf.run_ours(args, path)
    ids = vs_hf.batches(argparse.Namespace(batch=args.batch, seq=args.seq, steps=1), cfg.vocab_size)[0]
    times: dict[str, list[float]] = {"before": [], "after": []}
    for r in range(args.rounds + 1):
        for side in ("before", "after") if r % 2 == 0 else ("after", "before"):
            switch(before=side == "before")
            t = time.perf_counter()
            step(ids)
            if r:  # round 0 warms both variants up
                times[side].append(time.perf_counter() - t)
    before, after = (statistics.median(times[s]) for s in ("before", "after"))
    ratios = [b / a for b, a in zip(times["before"], times["after"])]
    print(f"{args.variant} | {args.mode} | {args.shape} | batch {args.batch} x {args.seq} | {args.rounds} rounds")
    print(f"median step: before {before:.3f} s, after {after:.3f} s, speed-up {before / after:.3f}x")
    print("per-round before/after:", " ".join(f"{x:.2f}" for x in ratios),
          f"(after faster in {sum(x > 1 for x in ratios)} of {len(ratios)})")


if __name__ == "__main__":
    main()
