"""Stage 3 from unpaired feedback: KTO (or unpaired APO-zero) on the SFT model with a new LoRA.

    python examples/kto.py                           # runs/sft/merged + the demo's pairs, unpaired -> runs/kto
    python examples/kto.py --model runs/sft/merged --data feedback.jsonl --beta 0.1 --undesirable-weight 1.3
    qwen-tune kto --config qwen_lora_kto.yaml        # a LLaMA-Factory recipe (stage: kto) or TRL KTOConfig names

KTO learns from single completions marked good or bad, not from pairs: TRL's KTOTrainer and
LLaMA-Factory's `stage: kto`. Its own script rather than `dpo.py --loss kto`, because what a user
of either brings differs from DPO's: unpaired rows (TRL's prompt/completion/label, LLaMA-Factory's
messages + label), KTOConfig's options (desirable_weight, undesirable_weight, loss_type kto |
apo_zero_unpaired) and a batch that must hold several rows (the KL baseline is estimated from
the batch's own completions paired with other prompts), none of which DPO's pairs carry.

Data: .jsonl of {"prompt": str | [messages], "completion": str | [message], "label": true|false}, or
{"messages": [..., assistant], "label": bool} (LLaMA-Factory's kto format; "kto_tag" accepted), or
preference pairs in any format dpo.py reads, unpaired as TRL does (chosen -> true, rejected ->
false). Rendered with the model folder's chat template; only the completion is scored (content +
<|im_end|>). The reference is the model with its adapters disabled, as in DPO. metrics.jsonl carries
TRL's names: kl, rewards/chosen, rewards/rejected, rewards/margins, logps/chosen, logps/rejected,
count/chosen, count/rejected.

Writes into --out: adapter/ (PEFT format + tokenizer files), merged/ (the aligned model merged
into its base: a complete HF model whose eos is <|im_end|>), checkpoints/, metrics.jsonl, run.json.

With no --data, the rows come from the demo's SFT set (demo.corpus.kto_rows): each question's real
answer is desirable, the same answer degenerated into a repetition loop (its first words over and
over, the failure of a small model's greedy decoding) undesirable; balanced labels, and no text is
both. The held-out reward margin (desirable minus undesirable, beta x log-ratio to the reference)
and the gap in log-likelihood between the real answers and the loops are printed before and after.
"""

from __future__ import annotations

from functools import partial

from cli import flags, inputs, options, outdir, runtime
from cli.console import Timer, chat_ids, generate_text, list_outputs, log, print_training_curve
from cli.errors import UsageError, run_main
from data import held_out_questions, kto_collate, kto_datasets
from models.qwen.tokenizer import load_tokenizer


def build_parser() -> flags.Parser:
    return options.parser("kto", __doc__)


def main(argv=None) -> int:
    args, given = flags.parse(build_parser(), argv, stage="kto")
    flags.check_training_flags(args)
    if args.finetuning != "lora":
        raise UsageError(f"--finetuning {args.finetuning}: the reference model of KTO is the model with its adapters "
                         "disabled, so this stage trains LoRA adapters (--finetuning lora)")
    timer = Timer()

    # ---- inputs, all checked before anything loads or is written
    given_inputs = inputs.pair_inputs(args, given, "kto")
    model_dir, data_paths, eval_path, changed = (given_inputs.model_dir, given_inputs.data_paths,
                                                 given_inputs.eval_path, given_inputs.changed)
    questions_from = given_inputs.demo_questions   # held-out unpaired rows are not questions
    if args.loss_type == "kto" and args.batch_size < 2:
        raise UsageError(f"--batch-size {args.batch_size}: --loss-type kto estimates its KL baseline from the other "
                         "rows of a micro-batch, so it needs at least 2 (TRL refuses 1 too); or --loss-type "
                         "apo_zero_unpaired")
    inputs.check_max_prompt_len(args, "the completion needs")
    out = outdir.claim_training_run(args, "kto", model_dir, data_paths, eval_path)

    log(f"== qwen-tune stage 3: {args.loss_type} from unpaired feedback ({'QLoRA' if args.qlora else 'LoRA'}) ==")
    if changed:
        log(f"embedded-default model detected; demo settings (flags you give win): {' '.join(changed)}")
    if not args.data:
        log(f"rows from the demo's SFT set (real answer: desirable, the same answer looping on its first words: "
            f"undesirable): {data_paths[0]}")
    tok, tok_source = load_tokenizer(model_dir)
    log(f"tokenizer: {tok_source}; chat template: {getattr(tok, 'chat_template_source', 'ChatML')}")
    runtime.check_vocab(model_dir, tok)

    # ---- data (encoded before the model loads)
    train_ds, eval_ds, info = kto_datasets(data_paths, tok, max_len=args.max_len, max_prompt_len=args.max_prompt_len,
                                           eval_path=eval_path, eval_fraction=args.eval_fraction, seed=args.seed,
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

    from train.kto import KTOObjective

    objective = KTOObjective(loss_type=args.loss_type, beta=args.beta, desirable_weight=args.desirable_weight,
                             undesirable_weight=args.undesirable_weight)
    chat_tok = tok.set_eos("<|im_end|>")
    trainer = runtime.build_trainer(model, args, out, train_ds, eval_ds, tokenizer=chat_tok, objective=objective,
                                    collate_fn=partial(kto_collate, max_len=args.max_len), say=log)
    before = trainer.evaluate() if eval_ds is not None else None
    if before:
        log(f"held-out before: {_rewards(before)}")
    answers_before = [generate_text(model, tok, chat_ids(tok, q, template_kwargs=args.chat_template_kwargs),
                                    max_new_tokens=args.sample_tokens, stream=False) for q in questions]

    summary = trainer.fit()
    print_training_curve(out, f"{args.loss_type} loss per row")
    after = summary["final_eval"]
    if before and after:
        after = {k[4:]: v for k, v in after.items() if k.startswith("val_")}
        log(f"\nheld-out after:  {_rewards(after)}")
        log(_change(before, after))
    for q, a0 in zip(questions, answers_before):
        a1 = generate_text(model, tok, chat_ids(tok, q, template_kwargs=args.chat_template_kwargs),
                           max_new_tokens=args.sample_tokens, stream=False)
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
    """One line of the KTO metrics of an evaluation (TRL's names)."""
    def num(key):
        return f"{result[key]:.4f}" if key in result else "n/a"

    return (f"loss {result['loss']:.4f}, rewards/margins {num('rewards/margins')} (chosen {num('rewards/chosen')}, "
            f"rejected {num('rewards/rejected')}), kl {num('kl')} over {result['examples']} rows "
            f"({int(result.get('count/chosen', 0))} desirable, {int(result.get('count/rejected', 0))} undesirable)")


def _change(before: dict, after: dict) -> str:
    """What training changed on the held-out rows, in two numbers a user can read."""
    def gap(result):
        return result["logps/chosen"] - result["logps/rejected"]

    if not all(k in r for r in (before, after) for k in ("rewards/margins", "logps/chosen", "logps/rejected")):
        return "held-out change: n/a (the held-out rows need both labels)"
    return (f"held-out change: reward margin (desirable - undesirable) {before['rewards/margins']:.3f} -> "
            f"{after['rewards/margins']:.3f}; log-likelihood of a desirable minus an undesirable completion "
            f"{gap(before):.2f} -> {gap(after):.2f} nats")


if __name__ == "__main__":
    run_main(main)
