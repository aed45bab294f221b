"""Stage 2: instruction SFT with a new LoRA on the (merged) stage-1 model.

    python examples/sft.py                         # runs/cpt-merged + the embedded Q/A set -> runs/sft
    python examples/sft.py --model runs/merged --data instructions.jsonl --out runs/sft
    qwen-tune sft --config qwen_lora_sft.yaml      # a LLaMA-Factory recipe runs unchanged

Data: .jsonl in the messages format ({"messages": [{"role", "content"}, ...]}, optionally with
"tools", assistant "tool_calls" and "tool" results), alpaca ({"instruction", "input", "output"})
or ShareGPT. Conversations are rendered with the chat template the model folder carries, exactly
as transformers renders it; the loss is on each assistant turn through its <|im_end|>. Writes
into --out: adapter/ (PEFT format + tokenizer files), merged/ (the SFT model merged into its
base: a complete HF model), checkpoints/, metrics.jsonl, run.json. The saved model's eos is
<|im_end|> in config.json, generation_config.json and the tokenizer config, so chat generation
stops where the assistant turn ends.

With no --data, the SFT set is built from Python's own documentation: questions such as
"What does the function `json.dumps` do?" answered by the first paragraph of its docstring.
"""

from __future__ import annotations


from cli import flags, inputs, options, outdir, paths, runtime
from cli.console import Timer, chat_ids, generate_text, list_outputs, log, print_training_curve
from cli.errors import run_main
from data import held_out_questions, sft_datasets
from models.qwen.tokenizer import load_tokenizer


def build_parser() -> flags.Parser:
    return options.parser("sft", __doc__)


def main(argv=None) -> int:
    args, given = flags.parse(build_parser(), argv, stage="sft")
    flags.check_training_flags(args)
    timer = Timer()

    # ---- inputs, all checked before anything loads or is written
    model_dir = inputs.model_dir_or_default(args.model, paths.MERGED_OUT, "examples/cpt.py and examples/merge.py")
    corpus = None
    if args.data:
        data_paths, eval_path = inputs.jsonl_data(args)
    else:
        from demo import corpus as demo_corpus

        corpus = demo_corpus.build()
        data_paths, eval_path = [corpus.sft_train], corpus.sft_eval
    from demo.base_model import is_demo_shape

    changed = options.apply_embedded(args, given, "sft") if is_demo_shape(model_dir) else []
    out = outdir.claim_training_run(args, "sft", model_dir, data_paths, eval_path)

    log(f"== qwen-tune stage 2: instruction SFT ({'QLoRA' if args.qlora else args.finetuning}) ==")
    if changed:
        log(f"embedded-default model detected; demo settings (flags you give win): {' '.join(changed)}")
    if corpus is not None:
        st = corpus.stats
        log(f"SFT set built from the Python {st['python']} documentation: {st['sft_train']} training and "
            f"{st['sft_eval']} held-out conversations -> {corpus.sft_train}")
    tok, tok_source = load_tokenizer(model_dir)
    log(f"tokenizer: {tok_source}; chat template: {getattr(tok, 'chat_template_source', 'ChatML')}")
    runtime.check_vocab(model_dir, tok)

    # ---- data (encoded before the model loads: a bad line is reported in seconds, not after a 7B load)
    train_ds, eval_ds, info = sft_datasets(data_paths, tok, max_len=args.max_len, eval_path=eval_path,
                                           eval_fraction=args.eval_fraction, seed=args.seed, fmt=args.format,
                                           chat_template_kwargs=args.chat_template_kwargs)
    log(f"data: {info}")
    questions = held_out_questions(eval_path, args.sample_questions) if eval_path else []

    # ---- model
    model = runtime.load_model(model_dir, args.dtype, qlora=args.qlora)
    model.use_chat_eos()   # an SFT model is a chat model: its saved config stops at <|im_end|>
    lora_settings = runtime.prepare_for_training(model, args)
    trainable, total = runtime.parameter_counts(model)
    log(f"model: {model_dir}, dtype {args.dtype}{', base in NF4' if args.qlora else ''}; "
        + (f"LoRA r={args.lora_r} alpha={args.lora_alpha:g}: " if args.finetuning != "full" else "")
        + f"{trainable:,} trainable of {total:,} parameters")
    coverage = runtime.adapter_coverage(model)
    if coverage:
        log(coverage)

    # ---- before, train, after
    chat_tok = tok.set_eos("<|im_end|>")   # the saved outputs stop at <|im_end|>
    trainer = runtime.build_trainer(model, args, out, train_ds, eval_ds, lora_config=lora_settings,
                                    tokenizer=chat_tok, say=log)
    before = trainer.evaluate() if eval_ds is not None else None
    if before:
        log(f"held-out answer loss before SFT: {before['loss']:.4f} (perplexity {before['ppl']:.2f}, "
            f"{before['tokens']:,} supervised tokens)")
    answers_before = [generate_text(model, tok, chat_ids(tok, q, template_kwargs=args.chat_template_kwargs), max_new_tokens=args.sample_tokens, stream=False)
                      for q in questions]

    summary = trainer.fit()
    print_training_curve(out, "training loss on assistant tokens")
    after = summary["final_eval"]
    if before and after:
        log(f"\nheld-out answer loss: before {before['loss']:.4f} -> after {after['val_loss']:.4f} "
            f"(perplexity {before['ppl']:.2f} -> {after['val_ppl']:.2f})")
    for q, a0 in zip(questions, answers_before):
        a1 = generate_text(model, tok, chat_ids(tok, q, template_kwargs=args.chat_template_kwargs), max_new_tokens=args.sample_tokens, stream=False)
        log(f"\n>>> {q}\n[before] {' '.join(a0.split())}\n[after]  {' '.join(a1.split())}")

    if not args.no_merge and args.finetuning != "full":
        runtime.save_merged(model, model_dir, out, args.dtype, args.qlora, tokenizer=chat_tok)
    log(f"\noutputs ({timer}):")
    log(list_outputs(out))
    log(f"  training summary: {runtime.summary_line(summary)}")
    tuned = out / ("model" if args.finetuning == "full" else "merged")
    if args.finetuning != "full" and args.no_merge:
        log(f"\nnext: python examples/generate.py --model {model_dir} --adapter {out / 'adapter'}   "
            "(add --compare for base vs tuned)")
    else:
        log(f"\nnext: python examples/dpo.py --model {tuned}   (preference alignment), or "
            f"python examples/generate.py --model {tuned}   (chat with it)")
    return 0


if __name__ == "__main__":
    run_main(main)
