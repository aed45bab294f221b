"""Stage 1: continued pretraining (CPT) of a Qwen base model on text, with LoRA or QLoRA.

    python examples/cpt.py                                   # the embedded default (see below)
    python examples/cpt.py --model /models/Qwen2.5-7B --qlora --data corpus/ --out runs/cpt

Writes into --out: adapter/ (PEFT format, with the tokenizer files), checkpoints/step-N/,
metrics.jsonl (one JSON object per logged step) and run.json (the settings of the run), and
prints the loss curve and held-out perplexity before and after.

With no --model and no --data it runs a real, small job on any machine: a small
Qwen2-architecture model with Qwen's real tokenizer (151936-row vocabulary), pretrained once
on the "general" part of Python's own documentation (cached under ~/.cache/qwen-tune), then
LoRA-CPT on the "domain" part (networking / concurrency / data-format docs of the stdlib).
Next: python examples/merge.py; python examples/sft.py; python examples/generate.py.
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


def build_parser() -> _cli.Parser:
    p = _cli.new_parser("cpt.py", __doc__)
    _cli.add_training_flags(p, sft=False)
    p.add_argument("--text-field", default="text", help="field holding the text in .jsonl data")
    p.add_argument("--no-document-mask", action="store_true",
                   help="let attention cross document boundaries inside a packed block (plain concatenation)")
    p.add_argument("--sample-prompt", default="The json module",
                   help="prompt of the completion printed before and after training")
    p.add_argument("--sample-tokens", type=_cli.positive_int, default=40, help="tokens of that completion")
    p.add_argument("--sample-temperature", type=_cli.non_negative_float, default=0.8,
                   help="sampling temperature of that completion (0 = greedy; top-p 0.9, seed 0 either way)")
    return p


def main(argv=None) -> int:
    args = _cli.parse_args(build_parser(), argv)
    _cli.check_training_flags(args)
    timer = P.Timer()

    # ---- resolve inputs (all checks happen before anything is written)
    embedded_model = args.model is None
    if args.data:
        data_paths = _cli.check_data_paths(args.data)
    if not embedded_model:
        model_dir = _cli.check_model_dir(args.model)
    else:
        model_dir = P.demo_base_dir()
        demo = P.apply_demo_defaults(args, P.DEMO_CPT)
    if args.epochs is None and args.max_steps is None:
        args.epochs = 2.0
    args.dtype = P.resolve_dtype(args.dtype)
    if args.qlora and embedded_model and "qlora" in args._given and args.dtype == "fp32":
        pass  # QLoRA on the demo model is allowed (NF4 base, fp32 compute)
    out = Path(args.out) if args.out else _cli.DEFAULT_CPT_OUT

    from data import pydocs

    corpus = None
    if not args.data:
        corpus = pydocs.build()
        data_paths = [corpus.domain]
    identity = _cli.run_identity(args, {"stage": "cpt", "model": str(Path(model_dir).resolve()),
                                        "data": [str(Path(p).resolve()) for p in data_paths]})
    _cli.prepare_out_dir(out, identity, resume=args.resume, overwrite=args.overwrite)

    # ---- report what will happen
    P.log(f"== qwen-tune stage 1: continued pretraining ({'QLoRA' if args.qlora else 'LoRA'}) ==")
    if embedded_model:
        P.log("embedded default: a small Qwen2-architecture model with Qwen's real tokenizer, trained on "
              "Python's own documentation")
        if demo:
            P.log(f"  demo settings (flags you give win): {' '.join(demo)}")
    if corpus is not None:
        st = corpus.stats
        P.log(f"corpus: Python {st['python']} standard library docs at {st['stdlib']}")
        P.log(f"  domain  (CPT data)      : {st['domain_documents']} documents, {st['domain_chars']:,} chars "
              f"-> {corpus.domain}")
        P.log(f"  general (base pretrain) : {st['general_documents']} documents, {st['general_chars']:,} chars "
              f"-> {corpus.general}")

    tok, tok_source = P.load_tokenizer(None if embedded_model else model_dir)
    P.log(f"tokenizer: {tok_source} ({len(tok)} tokens)")
    if embedded_model:
        P.ensure_demo_base(model_dir, tok, corpus or pydocs.build(), P.log)
    else:
        P.check_vocab(model_dir, tok)

    # ---- model + adapter
    model, trainable, total = P.load_model_with_lora(model_dir, args)
    P.log(f"model: {model_dir} ({model.config.model_type}, hidden {model.config.hidden_size}, "
          f"{model.config.num_hidden_layers} layers, vocab rows {model.config.vocab_size}), dtype {args.dtype}"
          f"{', base in NF4' if args.qlora else ''}")
    P.log(f"LoRA r={args.lora_r} alpha={args.lora_alpha:g} dropout={args.lora_dropout:g} targets={args.lora_targets}: "
          f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)")

    # ---- data
    train_ds, eval_ds, collate, info = P.cpt_datasets(
        data_paths, tok, block_size=args.block_size, eval_fraction=args.eval_fraction, seed=args.seed,
        text_field=args.text_field, document_mask=not args.no_document_mask,
    )
    P.log(f"data: {info}")
    eval_batches = P.eval_batches(eval_ds, collate, args.batch_size)

    # ---- before
    prompt = tok.encode(args.sample_prompt)
    # A fresh adapter has lora_B = 0, so before fit() the model computes exactly the base model.
    before = P.perplexity(model, eval_batches)
    P.log(f"held-out perplexity before CPT: {before['ppl']:.2f} (loss {before['loss']:.4f} over "
          f"{before['tokens']:,} tokens)")
    sampling = dict(max_new_tokens=args.sample_tokens, stop_ids=(151643,), temperature=args.sample_temperature,
                    top_p=0.9, seed=0)
    how = "greedy" if args.sample_temperature == 0 else f"sampled: temperature {args.sample_temperature:g}, top-p 0.9, seed 0"
    P.log(f"sample before ({how}): {args.sample_prompt!r} ->")
    P.generate_text(model, tok, prompt, **sampling)
    P.log()

    # ---- train
    summary, after = P.train_and_report(model, args, out, identity, train_ds, eval_ds, collate, eval_batches,
                                        loss_name="training loss")
    P.log(f"\nheld-out perplexity: before {before['ppl']:.2f} -> after {after['ppl']:.2f} "
          f"(loss {before['loss']:.4f} -> {after['loss']:.4f}, {after['tokens']:,} tokens)")
    P.log(f"sample after ({how}):  {args.sample_prompt!r} ->")
    P.generate_text(model, tok, prompt, **sampling)
    P.log()

    P.save_adapter(model, out / "adapter", model_dir, tok)
    P.log(f"\noutputs ({timer}):")
    P.log(P.list_outputs(out))
    P.log(f"  training summary: {P.short_summary(summary)}")
    extra = "" if args.out is None else f" --adapter {out / 'adapter'}"
    P.log(f"\nnext: python examples/merge.py{extra}   (merges the adapter into the base model)")
    return 0


if __name__ == "__main__":
    _cli.run_main(main)
