"""Chat with, or complete text from, a model directory with an optional LoRA adapter.

    python examples/generate.py                     # runs/cpt-merged + runs/sft/adapter, demo questions
    python examples/generate.py --model runs/sft/merged --prompt "What does json.dumps do?"
    python examples/generate.py --model /models/Qwen2.5-7B --adapter runs/cpt/adapter \\
        --mode completion --prompt "The TCP handshake"
    python examples/generate.py --compare           # base vs tuned answers side by side

Tokens are printed as they are generated. In chat mode the prompt is rendered with the
ChatML template and generation stops at <|im_end|> (or <|endoftext|>); in completion mode
the prompt is plain text and generation stops at <|endoftext|>.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

# The scripts run from a checkout: examples/ for the shared CLI helpers, the repository root
# for the packages (already importable after `pip install -e .`).
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import _cli  # noqa: E402
import _pipeline as P  # noqa: E402
from _cli import UsageError  # noqa: E402

DEMO_QUESTIONS = (
    "What does the function `json.dumps` do?",
    "What is the Python module `asyncio.queues` for?",
    "What is the signature of `urllib.parse.quote`?",
)


def build_parser() -> _cli.Parser:
    p = _cli.new_parser("generate.py", __doc__)
    p.add_argument("--model", metavar="DIR", help=f"model directory (default: {_cli.DEFAULT_MERGED_OUT})")
    p.add_argument("--adapter", metavar="DIR",
                   help=f"LoRA adapter directory (default with the default model: {_cli.DEFAULT_SFT_OUT / 'adapter'})")
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help="prompt or user message; repeat for several (default: demo questions)")
    p.add_argument("--mode", choices=("chat", "completion"), default="chat", help="ChatML chat or raw completion")
    p.add_argument("--system", default=None, help="system message in chat mode (default: the template's)")
    p.add_argument("--compare", action="store_true", help="answer with the base (no adapter) and the tuned model")
    p.add_argument("--max-new-tokens", type=_cli.positive_int, default=64, help="tokens to generate per prompt")
    p.add_argument("--temperature", type=_cli.non_negative_float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--qlora", action="store_true", help="load the base in NF4 (as it was trained with QLoRA)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="compute dtype")
    _cli.add_config_flag(p)
    return p


def resolve(args):
    if args.model is None:
        default = _cli.DEFAULT_MERGED_OUT
        if not default.is_dir():
            raise UsageError(f"--model: not given and {default} does not exist; run examples/cpt.py and "
                             f"examples/merge.py first, or pass --model DIR")
        model = _cli.check_model_dir(str(default), flag=f"--model (default {default})")
        if args.adapter is None and (_cli.DEFAULT_SFT_OUT / "adapter").is_dir():
            args.adapter = str(_cli.DEFAULT_SFT_OUT / "adapter")
    else:
        model = _cli.check_model_dir(args.model)
    adapter = _cli.check_adapter_dir(args.adapter) if args.adapter else None
    if args.compare and adapter is None:
        raise UsageError("--compare needs an --adapter (base = --model alone, tuned = --model + --adapter)")
    if not 0.0 < args.top_p <= 1.0:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise UsageError(f"--top-k must be >= 0, got {args.top_k}")
    return model, adapter


def main(argv=None) -> int:
    args = _cli.parse_args(build_parser(), argv)
    model_dir, adapter = resolve(args)
    dtype = P.resolve_dtype(args.dtype)

    import lora

    tok, tok_source = P.load_tokenizer(adapter, model_dir)
    P.check_vocab(model_dir, tok)
    prompts = args.prompt or list(DEMO_QUESTIONS if args.mode == "chat" else ("The json module",))
    P.log(f"model: {model_dir}" + (f" + adapter {adapter}" if adapter else "") + f"  (tokenizer: {tok_source})")

    model = P.load_model(model_dir, dtype, qlora=args.qlora)
    if adapter is not None:
        lora.load(model, adapter)
    model.eval()
    stop = P.CHAT_STOP if args.mode == "chat" else (151643,)

    def encode(text: str) -> list[int]:
        return P.chat_ids(tok, text, args.system) if args.mode == "chat" else tok.encode(text)

    def answer(text: str, label: str) -> str:
        sys.stdout.write(f"[{label}] ")
        sys.stdout.flush()
        out = P.generate_text(model, tok, encode(text), max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              stop_ids=stop, seed=args.seed)
        P.log()
        return out

    for text in prompts:
        P.log(f"\n>>> {text}")
        if not args.compare:
            answer(text, "tuned" if adapter else "model")
            continue
        with lora.disable_adapters(model):
            base = answer(text, "base")
        tuned = answer(text, "tuned")
        P.log(side_by_side(base, tuned))
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
    _cli.run_main(main)
