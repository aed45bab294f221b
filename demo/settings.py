"""The embedded default's flag values: what each stage runs with when no --model is given (the
tiny demo model on 2 CPU cores). Flags given on the command line or in --config always win;
`--help` lists these under "embedded default"."""

from __future__ import annotations

import argparse

CPT = dict(block_size=256, batch_size=4, grad_accum=2, max_steps=40, lr=2e-3, warmup_steps=4,
           lora_r=16, lora_alpha=32.0, eval_every=10, save_every=20)
SFT = dict(max_len=256, batch_size=8, grad_accum=1, max_steps=40, lr=2e-3, warmup_steps=4,
           lora_r=16, lora_alpha=32.0, eval_every=10, save_every=20)
DPO = dict(max_len=256, batch_size=4, grad_accum=2, max_steps=40, lr=5e-3, warmup_steps=4,
           lora_r=16, lora_alpha=32.0, eval_every=10, save_every=20, beta=0.1)
# evaluate.py: a slice of the held-out data (2 CPU cores, five models); windows match the demo's
# 256-token training blocks, with at least 64 tokens of context.
EVAL = dict(max_tokens=3072, max_instructions=24, max_new_tokens=32, max_length=256, stride=192)


def describe(settings: dict) -> str:
    """The --help epilog that lists a stage's embedded-default values."""
    flags = " ".join(f"--{k.replace('_', '-')} {v:g}" if isinstance(v, float) else f"--{k.replace('_', '-')} {v}"
                     for k, v in settings.items())
    return f"embedded default (no --model): the demo model runs with {flags} (flags you give win)"


def apply(args: argparse.Namespace, settings: dict) -> list[str]:
    """Fill the flags the user did not give (cli.flags.given: what argparse parsed, in any
    spelling, or --config set) with the embedded default's values; return them."""
    from cli.flags import given as given_dests

    given = given_dests(args)
    changed = []
    for key, value in settings.items():
        if key in given or not hasattr(args, key):
            continue
        if key == "max_steps" and getattr(args, "epochs", None) is not None:
            continue
        if key == "warmup_steps" and getattr(args, "warmup_ratio", None) is not None:
            continue
        setattr(args, key, value)
        changed.append(f"--{key.replace('_', '-')} {value}")
    if "warmup_steps" not in given and args.warmup_steps is not None and args.max_steps is not None:
        args.warmup_steps = min(args.warmup_steps, args.max_steps // 5)  # a short run gets a short warm-up
    return changed
