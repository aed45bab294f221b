"""A tiny fp32 training run for the distributed tests: one rank of a torchrun job, or the
whole single-process reference when imported.

    python -m torch.distributed.run --nproc_per_node 2 tests/train/run_dist.py '{"out_dir": ..., ...}'

Options (JSON): kind "lora" | "full"; parallel "ddp" | "fsdp"; max_steps; batch_size (per
process); grad_accum; save_every; resume; kill_at [rank, step, micro_batch]: that rank
SIGKILLs itself just before that micro-batch; objective "kto": KTO (train.kto.KTOObjective,
beta) on kto_dataset's unpaired rows, their KL rows rotated with kl_stride (data.kto_collate);
lr. The model (run_tiny's tiny Qwen, LoRA dropout 0 so that no random draw depends on the
split) and the data depend only on fixed seeds.
"""

import json
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run_tiny  # noqa: E402
import train  # noqa: E402
from train import distributed  # noqa: E402

SAMPLES = 20   # not a multiple of the global batch (6): steps straddle the epoch boundary


def kto_dataset(n: int = SAMPLES) -> list:
    """run_tiny's examples as unpaired KTO rows: the -100 head is the prompt, labels alternate."""
    return [dict(x, prompt_length=torch.tensor(int((x["labels"] == -100).sum())), label=torch.tensor(i % 3 != 1))
            for i, x in enumerate(run_tiny.dataset(n=n))]


def build(opts: dict) -> "train.Trainer":
    kind = opts.get("kind", "lora")
    extra = {}
    if opts.get("objective") == "kto":
        from functools import partial

        from data import kto_collate
        from train.kto import KTOObjective

        extra = dict(objective=KTOObjective(beta=opts.get("beta", 0.1)),
                     collate_fn=partial(kto_collate, pad_id=0, kl_stride=opts.get("kl_stride", 1),
                                        pad_to_multiple_of=opts.get("pad_to")))
    cfg = train.TrainConfig(
        out_dir=opts["out_dir"], lr=opts.get("lr", 5e-3), warmup_steps=1, max_steps=opts["max_steps"],
        batch_size=opts["batch_size"], grad_accum=opts["grad_accum"], dtype="fp32",
        save_every=opts.get("save_every"), keep_last=5, seed=3, progress=False,
        mode="full" if kind == "full" else "lora",
        weight_decay=0.01, eps=opts.get("eps", 1e-8), resume=opts.get("resume", False),
        parallel=opts.get("parallel", "ddp"),
    )
    data = kto_dataset() if extra else run_tiny.dataset(n=SAMPLES)
    trainer = train.Trainer(run_tiny.tiny_model(kind, dropout=0.0), cfg, data, **extra)
    kill_at = opts.get("kill_at")
    if kill_at and kill_at[0] == trainer.dist.rank:
        def hook(step, micro):
            if [step, micro] == kill_at[1:]:
                os.kill(os.getpid(), signal.SIGKILL)
        trainer.on_micro_batch = hook
    return trainer


def main() -> None:
    torch.set_num_threads(1)
    distributed.init_from_env()
    summary = build(json.loads(sys.argv[1])).fit()
    if distributed.is_main():
        print(json.dumps({"steps": summary["steps"], "resumed_from": summary["resumed_from"],
                          "world_size": distributed.world_size()}))
    distributed.end_process(0)


if __name__ == "__main__":
    main()
