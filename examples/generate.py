"""Chat with, or complete text from, a model directory with an optional LoRA adapter.

    python examples/generate.py                     # the latest stage's model (runs/dpo, else runs/sft), demo questions
    python examples/generate.py --model runs/sft/merged --prompt "What does json.dumps do?"
    python examples/generate.py --model /models/Qwen2.5-7B --adapter runs/cpt/adapter \\
        --mode completion --prompt "The TCP handshake"
    python examples/generate.py --compare           # base vs tuned answers side by side

Tokens are printed as they are generated. In chat mode the prompt is rendered with the chat
template the model folder carries and generation stops at <|im_end|> (or <|endoftext|>); in
completion mode the prompt is plain text and generation stops at <|endoftext|>.
"""

from __future__ import annotations

import sys
import textwrap

from cli import flags, inputs, options, paths, runtime
from cli.console import chat_ids, generate_text, log
from cli.errors import UsageError, run_main
from models.qwen import CHAT_STOP_IDS, ENDOFTEXT_ID
from models.qwen.tokenizer import load_tokenizer

DEMO_QUESTIONS = (
    "What does the function `json.dumps` do?",
    "What is the Python module `asyncio.queues` for?",
    "What is the signature of `urllib.parse.quote`?",
)


def build_parser() -> flags.Parser:
    return options.parser("generate", __doc__)


def resolve(args):
    """(model dir, adapter dir or None); with no --model/--adapter, the latest stage's output."""
    latest = paths.latest_tuned(prefer_adapter=args.compare) if args.model is None and args.adapter is None else None
    if latest is not None:
        stage, model, adapter = latest
        log(f"no --model: the latest stage's output, {stage} ({adapter or model})")
        args.model, args.adapter = str(model), (str(adapter) if adapter else None)
    model = inputs.model_dir_or_default(args.model, paths.MERGED_OUT, "examples/cpt.py and examples/merge.py")
    adapter = inputs.check_adapter_dir(args.adapter) if args.adapter else None
    if args.compare and adapter is None:
        raise UsageError("--compare needs an --adapter (base = --model alone, tuned = --model + --adapter)")
    if not 0.0 < args.top_p <= 1.0:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    return model, adapter


def main(argv=None) -> int:
    args = flags.parse(build_parser(), argv).args
    model_dir, adapter = resolve(args)

    import lora

    tok, tok_source = load_tokenizer(adapter, model_dir)
    runtime.check_vocab(model_dir, tok)
    prompts = args.prompt or list(DEMO_QUESTIONS if args.mode == "chat" else ("The json module",))
    log(f"model: {model_dir}" + (f" + adapter {adapter}" if adapter else "") + f"  (tokenizer: {tok_source})")

    model = runtime.load_model(model_dir, runtime.compute_dtype(args.dtype), qlora=args.qlora)
    if adapter is not None:
        lora.load(model, adapter)
    model.eval()
    stop = CHAT_STOP_IDS if args.mode == "chat" else (ENDOFTEXT_ID,)

    def encode(text: str) -> list[int]:
        if args.mode == "chat":
            return chat_ids(tok, text, args.system, args.chat_template_kwargs)   # an empty user message is a valid conversation
        # Qwen has no BOS: an empty completion prompt starts a new document, which is what
        # follows <|endoftext|> in pretraining.
        return tok.encode(text) or [ENDOFTEXT_ID]

    def answer(text: str, label: str, stream: bool = True) -> str:
        if stream:
            sys.stdout.write(f"[{label}] ")
            sys.stdout.flush()
        out = generate_text(model, tok, encode(text), max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, stop_ids=stop, seed=args.seed, stream=stream)
        if stream:
            log()
        return out

    for text in prompts:
        log(f"\n>>> {text}")
        if not args.compare:
            answer(text, "tuned" if adapter else "model")
            continue
        with lora.disable_adapters(model):  # both answers are printed once, side by side
            base = answer(text, "base", stream=False)
        tuned = answer(text, "tuned", stream=False)
        log(side_by_side(base, tuned))
    return 0


def side_by_side(left: str, right: str, width: int = 48) -> str:
    """Two answers in columns: base | tuned."""
    a = textwrap.wrap(left.strip() or "(empty)", width) or [""]
    b = textwrap.wrap(right.strip() or "(empty)", width) or [""]
    rows = [f"{'base'.ljust(width)} | tuned", f"{'-' * width}-+-{'-' * width}"]
    for i in range(max(len(a), len(b))):
        rows.append(f"{(a[i] if i < len(a) else '').ljust(width)} | {b[i] if i < len(b) else ''}")
    return "\n".join(rows)


if __name__ == "__main__":
    run_main(main)
