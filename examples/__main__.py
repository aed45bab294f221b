"""`qwen-tune <stage> [flags]` (and `python -m examples <stage>`): run a stage script.

    qwen-tune cpt --model Qwen2.5-7B --qlora --data corpus/
    qwen-tune sft --config qwen_lora_sft.yaml          # a LLaMA-Factory recipe runs unchanged
    qwen-tune delta residual --base ... --chat ... --target ... --out ...
"""

from __future__ import annotations

import importlib
import sys

STAGES = {
    "cpt": "stage 1: continued pretraining (LoRA / QLoRA / full)",
    "merge": "fold an adapter into its base model's 16-bit weights",
    "sft": "stage 2: instruction SFT (chat template, tool calling)",
    "dpo": "stage 3: preference alignment (DPO, IPO, SimPO, ORPO)",
    "reward": "stage 3: a reward model (Bradley-Terry on preference pairs) for GRPO",
    "grpo": "stage 4: RL with verifiable rewards (GRPO, DAPO, Dr. GRPO, GSPO)",
    "kto": "stage 3 from unpaired feedback: KTO, unpaired APO-zero",
    "generate": "chat with, or complete text from, a model (+ adapter)",
    "export": "write a merged model as GGUF for llama.cpp / Ollama",
    "evaluate": "held-out perplexity, answers and forgetting of several models",
    "residual": "add the instruction residual (chat - base) to a model",
    "extend_vocab": "mine domain tokens and add them to the vocabulary",
    "delta": "weight-delta tools: residual, diff, apply, arith, extract, report",
}


def usage() -> str:
    rows = "\n".join(f"  {name:<13} {what}" for name, what in STAGES.items())
    return f"usage: qwen-tune <command> [flags]   (qwen-tune <command> --help)\n\ncommands:\n{rows}\n"


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(usage())
        raise SystemExit(0 if argv else 2)
    command, rest = argv[0].replace("-", "_"), argv[1:]
    if command not in STAGES:
        sys.stderr.write(f"qwen-tune: error: unknown command {argv[0]!r}\n{usage()}")
        raise SystemExit(2)
    if command == "delta":
        from cli.delta import main as delta_main

        raise SystemExit(delta_main(rest, prog="qwen-tune delta"))
    module = importlib.import_module(f"examples.{command}")
    sys.argv = [f"qwen-tune {command}"] + rest
    from cli.errors import run_main

    run_main(module.main)


if __name__ == "__main__":
    main()
