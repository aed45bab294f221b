"""Stage 2: instruction SFT with a new LoRA on the (merged) stage-1 model.

    python examples/sft.py                         # runs/cpt-merged + the embedded Q/A set -> runs/sft
    python examples/sft.py --model runs/merged --data instructions.jsonl --out runs/sft

Data: .jsonl in the messages format ({"messages": [{"role", "content"}, ...]}) or alpaca
({"instruction", "input", "output"}); loss on assistant tokens only, each turn ending with
<|im_end|>. Writes into --out: adapter/ (PEFT format + tokenizer files), merged/ (the SFT
model merged into its base: a complete HF model), checkpoints/, metrics.jsonl, run.json.
The saved model's eos is <|im_end|> in config.json, generation_config.json and the
tokenizer config, so chat generation stops where the assistant turn ends.

With no --data, the SFT set is built from Python's own documentation: questions such as
"What does the function `json.dumps` do?" answered by the first paragraph of its docstring.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The scripts run from a checkout: examples/ for the shared CLI helpers, the repository root
# for the packages (already importable after `pip install -e .`).
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import _cli  # noqa: E402
import _pipeline as P  # noqa: E402
from _cli import UsageError  # noqa: E402

IM_END = "<|im_end|>"


def build_parser() -> _cli.Parser:
    p = _cli.new_parser("sft.py", __doc__)
    _cli.add_training_flags(p, sft=True)
    p.add_argument("--format", choices=("auto", "messages", "alpaca", "sharegpt"), default="auto",
                   help="format of --data lines")
    p.add_argument("--no-merge", action="store_true", help="write only adapter/, not merged/")
    p.add_argument("--sample-questions", type=int, default=3, help="held-out questions answered before/after")
    p.add_argument("--sample-tokens", type=_cli.positive_int, default=48, help="tokens per sample answer")
    return p


def main(argv=None) -> int:
    args = _cli.parse_args(build_parser(), argv)
    _cli.check_training_flags(args)
    timer = P.Timer()

    default_model = args.model is None
    if default_model:
        merged = _cli.DEFAULT_MERGED_OUT
        if not merged.is_dir():
            raise UsageError(f"--model: not given and {merged} does not exist; run examples/cpt.py and "
                             f"examples/merge.py first, or pass --model DIR")
        model_dir = _cli.check_model_dir(str(merged), flag=f"--model (default {merged})")
    else:
        model_dir = _cli.check_model_dir(args.model)
    if args.data:
        data_paths = _cli.check_data_paths(args.data)
        for path in data_paths:
            if path.is_dir():
                raise UsageError(f"--data {path}: is a directory; SFT data is one or more .jsonl files")
        eval_path = _cli.check_data_paths([args.eval_data], flag="--eval-data")[0] if args.eval_data else None
    demo = []
    if _is_demo_model(model_dir):
        demo = P.apply_demo_defaults(args, P.DEMO_SFT)
    if args.epochs is None and args.max_steps is None:
        args.epochs = 1.0
    args.dtype = P.resolve_dtype(args.dtype)
    out = Path(args.out) if args.out else _cli.DEFAULT_SFT_OUT

    corpus = None
    if not args.data:
        from data import pydocs

        corpus = pydocs.build()
        data_paths, eval_path = [corpus.sft_train], corpus.sft_eval
    identity = _cli.run_identity(args, {
        "stage": "sft", "model": str(model_dir.resolve()), "data": [str(Path(p).resolve()) for p in data_paths],
        "eval_data": str(Path(eval_path).resolve()) if eval_path else None,
    })
    _cli.prepare_out_dir(out, identity, resume=args.resume, overwrite=args.overwrite)

    P.log(f"== qwen-tune stage 2: instruction SFT ({'QLoRA' if args.qlora else 'LoRA'}) ==")
    if demo:
        P.log(f"embedded-default model detected; demo settings (flags you give win): {' '.join(demo)}")
    if corpus is not None:
        st = corpus.stats
        P.log(f"SFT set built from the Python {st['python']} documentation: {st['sft_train']} training and "
              f"{st['sft_eval']} held-out conversations -> {corpus.sft_train}")

    tok, tok_source = P.load_tokenizer(model_dir)
    P.log(f"tokenizer: {tok_source}")
    P.check_vocab(model_dir, tok)

    model, trainable, total = P.load_model_with_lora(model_dir, args)
    P.log(f"model: {model_dir}, dtype {args.dtype}{', base in NF4' if args.qlora else ''}; LoRA r={args.lora_r} "
          f"alpha={args.lora_alpha:g}: {trainable:,} trainable of {total:,} parameters")

    train_ds, eval_ds, collate, info = P.sft_datasets(
        data_paths, eval_path, tok, max_len=args.max_len, eval_fraction=args.eval_fraction, seed=args.seed,
        fmt=args.format,
    )
    P.log(f"data: {info}")
    eval_batches = P.eval_batches(eval_ds, collate, args.batch_size)
    questions = P.held_out_questions(eval_path, args.sample_questions) if eval_path else []

    # A fresh adapter has lora_B = 0: before fit() the model is exactly the stage-1 model.
    before = P.perplexity(model, eval_batches)
    P.log(f"held-out answer loss before SFT: {before['loss']:.4f} (perplexity {before['ppl']:.2f}, "
          f"{before['tokens']:,} supervised tokens)")
    answers_before = [P.generate_text(model, tok, P.chat_ids(tok, q), max_new_tokens=args.sample_tokens,
                                      stream=False) for q in questions]

    summary, after = P.train_and_report(model, args, out, identity, train_ds, eval_ds, collate, eval_batches,
                                        loss_name="training loss on assistant tokens")
    P.log(f"\nheld-out answer loss: before {before['loss']:.4f} -> after {after['loss']:.4f} "
          f"(perplexity {before['ppl']:.2f} -> {after['ppl']:.2f})")
    for q, a0 in zip(questions, answers_before):
        a1 = P.generate_text(model, tok, P.chat_ids(tok, q), max_new_tokens=args.sample_tokens, stream=False)
        P.log(f"\n>>> {q}\n[before] {' '.join(a0.split())}\n[after]  {' '.join(a1.split())}")

    # The saved SFT outputs stop at <|im_end|>: tokenizer config, config.json, generation_config.
    chat_tok = P.with_chat_eos(tok)
    P.save_adapter(model, out / "adapter", model_dir, chat_tok)
    if not args.no_merge:
        import lora

        lora.merge(model)
        P.set_chat_eos(model)
        P.save_model(model, out / "merged", chat_tok)
    P.log(f"\noutputs ({timer}):")
    P.log(P.list_outputs(out))
    P.log(f"  training summary: {P.short_summary(summary)}")
    P.log("\nnext: python examples/generate.py" + ("" if args.out is None and default_model else
          f" --model {model_dir} --adapter {out / 'adapter'}") + "   (add --compare for base vs tuned)")
    return 0


def _is_demo_model(model_dir: Path) -> bool:
    """True for the embedded-default model and models derived from it (same tiny shape)."""
    import json

    try:
        cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return all(cfg.get(k) == P.DEMO_BASE_SHAPE[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size"))


if __name__ == "__main__":
    _cli.run_main(main)
