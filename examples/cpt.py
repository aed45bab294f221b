"""Stage 1: continued pretraining (CPT) of a Qwen base model on text, with LoRA or QLoRA.

    python examples/cpt.py                                   # the embedded default (see below)
    python examples/cpt.py --model /models/Qwen2.5-7B --qlora --data corpus/ --out runs/cpt
    qwen-tune cpt --config recipe.yaml                       # the same, installed; LLaMA-Factory keys work

Writes into --out: adapter/ (PEFT format, with the tokenizer files), checkpoints/step-N/,
metrics.jsonl (one JSON object per logged step) and run.json (the settings of the run), and
prints the loss curve and held-out perplexity before and after.

With no --model it runs a real, small job on any machine: a small Qwen2-architecture model with
Qwen's real tokenizer (151936-row vocabulary), pretrained once on the "general" part of Python's
own documentation (cached under ~/.cache/qwen-tune), then LoRA-CPT on the "domain" part
(networking / concurrency / data-format docs of the stdlib).
Next: python examples/merge.py; python examples/sft.py; python examples/generate.py.
"""

from __future__ import annotations


from cli import flags, inputs, options, outdir, runtime
from cli.console import Timer, generate_text, list_outputs, log, note, print_training_curve
from cli.errors import run_main
from data import cpt_datasets
from models.qwen import ENDOFTEXT_ID
from models.qwen.tokenizer import load_tokenizer
from train import distributed


def build_parser() -> flags.Parser:
    return options.parser("cpt", __doc__)


def main(argv=None) -> int:
    args, given = flags.parse(build_parser(), argv, stage="cpt")
    flags.check_training_flags(args)
    timer = Timer()

    # ---- inputs, all checked before anything loads or is written
    data_paths = inputs.check_data_paths(args.data) if args.data else None
    embedded = args.model is None
    changed = []
    if embedded:
        from demo import base_model

        model_dir = base_model.base_dir()
        changed = options.apply_embedded(args, given, "cpt")
    else:
        model_dir = inputs.check_model_dir(args.model)
    corpus = None
    if data_paths is None or embedded:
        from demo import corpus as demo_corpus

        corpus = demo_corpus.build()
    if data_paths is None:
        data_paths = [corpus.domain]
    if embedded:
        # The run records the content of its model folder (run.json), so the embedded base must exist
        # first: on a fresh machine it is pretrained here, once, and cached.
        base_model.ensure_base(model_dir, load_tokenizer(None)[0], corpus, log)
    out = outdir.claim_training_run(args, "cpt", model_dir, data_paths)

    # ---- what will happen
    log(f"== qwen-tune stage 1: continued pretraining ({'QLoRA' if args.qlora else args.finetuning}) ==")
    if embedded:
        log("embedded default: a small Qwen2-architecture model with Qwen's real tokenizer, trained on "
            "Python's own documentation")
        if changed:
            log(f"  demo settings (flags you give win): {' '.join(changed)}")
    if not args.data:
        st = corpus.stats
        log(f"corpus: Python {st['python']} standard library docs at {st['stdlib']}")
        log(f"  domain  (CPT data)      : {st['domain_documents']} documents, {st['domain_chars']:,} chars -> {corpus.domain}")
        log(f"  general (base pretrain) : {st['general_documents']} documents, {st['general_chars']:,} chars -> {corpus.general}")
    tok, tok_source = load_tokenizer(None if embedded else model_dir)
    log(f"tokenizer: {tok_source} ({len(tok)} tokens)")
    if not embedded:
        runtime.check_vocab(model_dir, tok)
        too_long = inputs.check_block_size(model_dir, args.block_size)
        if too_long:
            note(too_long)

    # ---- data (tokenised before the model loads: a bad file is reported in seconds, not after a 7B load)
    train_ds, eval_ds, info = cpt_datasets(data_paths, tok, block_size=args.block_size, eval_fraction=args.eval_fraction,
                                           seed=args.seed, text_field=args.text_field,
                                           document_mask=not args.no_document_mask,
                                           main_process_first=distributed.main_process_first)
    log(f"data: {info}")

    # ---- model
    model = runtime.load_model(model_dir, args.dtype, qlora=args.qlora)
    lora_settings = runtime.prepare_for_training(model, args)
    trainable, total = runtime.parameter_counts(model)
    log(f"model: {model_dir} ({model.config.model_type}, hidden {model.config.hidden_size}, "
        f"{model.config.num_hidden_layers} layers, vocab rows {model.config.vocab_size}), dtype {args.dtype}"
        f"{', base in NF4' if args.qlora else ''}")
    if args.finetuning != "full":
        log(f"LoRA r={args.lora_r} alpha={args.lora_alpha:g} dropout={args.lora_dropout:g} targets={args.lora_targets}"
            + ("" if args.finetuning == "lora" else f" (injected after {args.full_fraction:g} of the steps)"))
    log(f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)")
    coverage = runtime.adapter_coverage(model)
    if coverage:
        log(coverage)

    # ---- before, train, after
    trainer = runtime.build_trainer(model, args, out, train_ds, eval_ds, lora_config=lora_settings, tokenizer=tok, say=log)
    before = trainer.evaluate() if eval_ds is not None else None
    if before:
        log(f"held-out perplexity before CPT: {before['ppl']:.2f} (loss {before['loss']:.4f} over "
            f"{before['tokens']:,} tokens)")
    prompt = tok.encode(args.sample_prompt)
    sampling = dict(max_new_tokens=args.sample_tokens, stop_ids=(ENDOFTEXT_ID,), temperature=args.sample_temperature,
                    top_p=0.9, seed=0)
    how = "greedy" if args.sample_temperature == 0 else f"sampled: temperature {args.sample_temperature:g}, top-p 0.9, seed 0"
    log(f"sample before ({how}): {args.sample_prompt!r} ->")
    generate_text(model, tok, prompt, **sampling)
    log()

    summary = trainer.fit()
    print_training_curve(out, "training loss")
    after = summary["final_eval"]
    if before and after:
        log(f"\nheld-out perplexity: before {before['ppl']:.2f} -> after {after['val_ppl']:.2f} "
            f"(loss {before['loss']:.4f} -> {after['val_loss']:.4f}, {after['val_tokens']:,} tokens)")
    log(f"sample after ({how}):  {args.sample_prompt!r} ->")
    generate_text(model, tok, prompt, **sampling)
    log()

    log(f"\noutputs ({timer}):")
    log(list_outputs(out))
    log(f"  training summary: {runtime.summary_line(summary)}")
    if args.finetuning == "full":
        log(f"\nnext: python examples/sft.py --model {out / 'model'}   (instruction SFT on the trained model)")
    else:
        extra = "" if "out" not in given else f" --adapter {out / 'adapter'}"
        log(f"\nnext: python examples/merge.py{extra}   (merges the adapter into its base model)")
    return 0


if __name__ == "__main__":
    run_main(main)
