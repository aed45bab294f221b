"""A tiny training run in its own process, for the resume / crash / signal tests.

    python tests/train/run_tiny.py '{"out_dir": "...", "kind": "lora", "max_steps": 6, ...}'

Options (JSON): kind "lora" | "qlora" | "full"; max_steps; grad_accum; batch_size; save_every;
resume; dtype; kill_at [step, micro_batch, "KILL" | "TERM"] sends that signal to this
process just before that micro-batch; crash_in_save_at N ends the process with os._exit(3)
halfway through writing checkpoint step-N (after the weights, before the optimizer).
The model and data depend only on fixed seeds, so every process starts from the same state.
"""

import json
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import train  # noqa: E402
import train.loop  # noqa: E402
from models.qwen import Qwen, QwenConfig  # noqa: E402

VOCAB = 320


def tiny_model(kind: str, dropout: float = 0.1) -> Qwen:
    """The tiny model of a run kind: "full" (every parameter trains), "lora" or "qlora" (adapters
    r=4, alpha=8 on every linear; the base in NF4 for qlora)."""
    import lora

    torch.manual_seed(1234)
    model = Qwen(QwenConfig.preset("tiny", vocab_size=VOCAB, num_hidden_layers=2))
    if kind == "qlora":
        import quant

        quant.quantize_model(model, skip=("lm_head",))
    if kind != "full":
        lora.inject(model, r=4, alpha=8, dropout=dropout)
    return model


def dataset(n: int = 24, seed: int = 7) -> list:
    """SFT-like examples of varied length: a prompt (-100) then supervised tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(6, 24, (1,), generator=g))
        ids = torch.randint(0, VOCAB, (length,), generator=g)
        labels = ids.clone()
        labels[: int(torch.randint(1, length // 2, (1,), generator=g))] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def build(opts: dict) -> "train.Trainer":
    """The Trainer of these options (in this process), hooks installed."""
    kind = opts.get("kind", "lora")
    model = tiny_model(kind)
    cfg = train.TrainConfig(
        out_dir=opts["out_dir"], lr=opts.get("lr", 5e-3), warmup_steps=1, max_steps=opts["max_steps"],
        batch_size=opts.get("batch_size", 2), grad_accum=opts.get("grad_accum", 3), dtype=opts.get("dtype", "bf16"),
        save_every=opts.get("save_every"), keep_last=opts.get("keep_last", 2), seed=3, progress=False,
        mode="full" if kind == "full" else "lora",
        weight_decay=0.01, resume=opts.get("resume", False), eval_every=opts.get("eval_every"),
    )
    data = dataset()
    trainer = train.Trainer(model, cfg, data, eval_dataset=data[:4] if opts.get("eval_every") else None)

    kill_at = opts.get("kill_at")
    if kill_at:
        def hook(step, micro):
            if [step, micro] == kill_at[:2]:
                os.kill(os.getpid(), getattr(signal, "SIG" + kill_at[2]))
        trainer.on_micro_batch = hook

    crash = opts.get("crash_in_save_at")
    if crash:
        import train.checkpoint.state as state

        real = state.save_tensors

        def crashing_save(path, tensors):
            real(path, tensors)
            if path.name == "trainable.safetensors" and path.parent.name.startswith(f".tmp-step-{crash}-"):
                os._exit(3)
        state.save_tensors = crashing_save

    return trainer


def main() -> None:
    torch.set_num_threads(1)
    try:
        summary = build(json.loads(sys.argv[1])).fit()
    except train.Interrupted as e:
        print(json.dumps({"steps": e.step, "interrupted": e.signal, "checkpoint": e.checkpoint}))
        raise SystemExit(130 if e.signal == "SIGINT" else 143)
    print(json.dumps({"steps": summary["steps"], "interrupted": None, "resumed_from": summary["resumed_from"]}))


if __name__ == "__main__":
    main()
