"""Stage 3: preference alignment of the SFT model with a new LoRA: DPO, IPO, SimPO or ORPO.

    python examples/dpo.py                          # runs/sft/merged + pairs from the demo Q/A set -> runs/dpo
    python examples/dpo.py --model runs/sft/merged --data pairs.jsonl --loss sigmoid --beta 0.1
    qwen-tune dpo --config qwen_lora_dpo.yaml       # a LLaMA-Factory recipe (pref_beta, pref_loss) runs unchanged

Data: .jsonl of preference pairs in TRL's format ({"prompt" | "messages", "chosen", "rejected"},
the responses as strings or assistant message lists, or two whole conversations that share a
prompt) or LLaMA-Factory's ranking formats (sharegpt "conversations" + "chosen"/"rejected", alpaca
"instruction" + "chosen"/"rejected"). Pairs are rendered with the model folder's chat template;
the prompt is shared and only the answers are scored (content + <|im_end|>). Chosen and rejected
run in one forward. The reference model costs no second copy: it is the same model with its
adapters disabled (over an NF4 base too), or its log-probs computed once (--reference
precomputed); SimPO and ORPO need none. metrics.jsonl carries TRL's names: rewards/chosen,
rewards/rejected, rewards/margins, rewards/accuracies, logps/chosen, logps/rejected.

Writes into --out: adapter/ (PEFT format + tokenizer files), merged/ (the aligned model merged
into its base: a complete HF model whose eos is <|im_end|>), checkpoints/, metrics.jsonl, run.json.

With no --data, the pairs come from the demo's SFT set (each question's real answer against
the answer to a different question), so held-out reward accuracy and margin rise visibly.
"""

from __future__ import annotations


from cli import flags, inputs, options, outdir, runtime
from cli.console import Timer, chat_ids, generate_text, list_outputs, log, print_training_curve
from cli.errors import UsageError, run_main
from data import held_out_questions, preference_collate, preference_datasets
from models.qwen.tokenizer import load_tokenizer

def build_parser() -> flags.Parser:
    return options.parser("dpo", __doc__)


def main(argv=None) -> int:
    args, given = flags.parse(build_parser(), argv, stage="dpo")
    flags.check_training_flags(args)
    if args.finetuning != "lora":
        raise UsageError(f"--finetuning {args.finetuning}: the reference model of DPO is the model with its adapters "
                         "disabled, so this stage trains LoRA adapters (--finetuning lora)")
    if args.label_smoothing >= 0.5:
        raise UsageError(f"--label-smoothing {args.label_smoothing}: expected a value in [0, 0.5)")
    if args.label_smoothing and args.loss not in ("sigmoid", "simpo"):
        raise UsageError(f"--label-smoothing applies to --loss sigmoid and simpo, not {args.loss}")
    timer = Timer()

    # ---- inputs, all checked before anything loads or is written
    given_inputs = inputs.pair_inputs(args, given, "dpo")
    model_dir, data_paths, eval_path, changed = (given_inputs.model_dir, given_inputs.data_paths,
                                                 given_inputs.eval_path, given_inputs.changed)
    questions_from = eval_path if args.data else given_inputs.demo_questions
    inputs.check_max_prompt_len(args, "the answers need")
    out = outdir.claim_training_run(args, "dpo", model_dir, data_paths, eval_path)

    log(f"== qwen-tune stage 3: preference alignment ({args.loss}, {'QLoRA' if args.qlora else 'LoRA'}) ==")
    if changed:
        log(f"embedded-default model detected; demo settings (flags you give win): {' '.join(changed)}")
    if not args.data:
        log(f"pairs derived from the demo's SFT set (real answer vs the answer to another question): {data_paths[0]}")
    tok, tok_source = load_tokenizer(model_dir)
    log(f"tokenizer: {tok_source}; chat template: {getattr(tok, 'chat_template_source', 'ChatML')}")
    runtime.check_vocab(model_dir, tok)

    # ---- data (encoded before the model loads)
    train_ds, eval_ds, info = preference_datasets(data_paths, tok, max_len=args.max_len,
                                                  max_prompt_len=args.max_prompt_len, eval_path=eval_path,
                                                  eval_fraction=args.eval_fraction, seed=args.seed,
                                                  chat_template_kwargs=args.chat_template_kwargs)
    log(f"data: {info}")
    questions = held_out_questions(questions_from, args.sample_questions) if questions_from else []

    # ---- model: a fresh adapter on the SFT model, whose adapters-off self is the reference
    model = runtime.load_model(model_dir, args.dtype, qlora=args.qlora)
    model.use_chat_eos()
    runtime.prepare_for_training(model, args)
    trainable, total = runtime.parameter_counts(model)
    log(f"model: {model_dir}, dtype {args.dtype}{', base in NF4' if args.qlora else ''}; LoRA r={args.lora_r} "
        f"alpha={args.lora_alpha:g}: {trainable:,} trainable of {total:,} parameters")
    coverage = runtime.adapter_coverage(model)
    if coverage:
        log(coverage)

    from train.preference import PreferenceObjective, precompute_reference_logps

    reference = None if args.loss in ("simpo", "orpo") else args.reference
    objective = PreferenceObjective(loss=args.loss, beta=args.beta, label_smoothing=args.label_smoothing,
                                    gamma=args.simpo_gamma, reference=reference)
    if reference == "precomputed":
        from models.qwen.config import dtype_from_name

        dtype = None if args.dtype == "fp32" else dtype_from_name(args.dtype)
        train_ds = precompute_reference_logps(model, train_ds, autocast_dtype=dtype)
        eval_ds = precompute_reference_logps(model, eval_ds, autocast_dtype=dtype) if eval_ds is not None else None
        log("reference log-probs computed once (the model with its adapters disabled)")

    chat_tok = tok.set_eos("<|im_end|>")
    trainer = runtime.build_trainer(model, args, out, train_ds, eval_ds, tokenizer=chat_tok, objective=objective,
                                    collate_fn=preference_collate, say=log)
    before = trainer.evaluate() if eval_ds is not None else None
    if before:
        log(f"held-out before: {_rewards(before)}")
    answers_before = [generate_text(model, tok, chat_ids(tok, q, template_kwargs=args.chat_template_kwargs), max_new_tokens=args.sample_tokens, stream=False)
                      for q in questions]

    summary = trainer.fit()
    print_training_curve(out, f"{args.loss} loss per pair")
    after = summary["final_eval"]
    if before and after:
        log(f"\nheld-out after:  {_rewards({k[4:]: v for k, v in after.items() if k.startswith('val_')})}")
    for q, a0 in zip(questions, answers_before):
        a1 = generate_text(model, tok, chat_ids(tok, q, template_kwargs=args.chat_template_kwargs), max_new_tokens=args.sample_tokens, stream=False)
        log(f"\n>>> {q}\n[before] {' '.join(a0.split())}\n[after]  {' '.join(a1.split())}")

    if not args.no_merge:
        runtime.save_merged(model, model_dir, out, args.dtype, args.qlora, tokenizer=chat_tok)
    log(f"\noutputs ({timer}):")
    log(list_outputs(out))
    log(f"  training summary: {runtime.summary_line(summary)}")
    tuned = out / "merged"
    log(f"\nnext: python examples/generate.py --model {tuned}   (chat with the aligned model), or "
        f"python examples/export.py --model {tuned}   (GGUF for llama.cpp / Ollama)")
    return 0


def _rewards(result: dict) -> str:
    """One line of the preference metrics of an evaluation (TRL's names)."""
    return (f"loss {result['loss']:.4f}, rewards/accuracies {result['rewards/accuracies']:.3f}, "
            f"rewards/margins {result['rewards/margins']:.4f} (chosen {result['rewards/chosen']:.4f}, "
            f"rejected {result['rewards/rejected']:.4f}) over {result['pairs']} pairs")


if __name__ == "__main__":
    run_main(main)
