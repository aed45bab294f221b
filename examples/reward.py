"""Stage 3: a reward model: a score head on the SFT model trained on preference pairs (Bradley-Terry).

    python examples/reward.py                       # runs/sft/merged + pairs from the demo Q/A set -> runs/rm
    python examples/reward.py --model Qwen2.5-0.5B-Instruct --qlora --data pairs.jsonl --out runs/rm
    qwen-tune reward --config qwen_lora_rm.yaml     # a LLaMA-Factory recipe (stage: rm) runs unchanged

Data: the pairs dpo.py takes (TRL's {"prompt" | "messages", "chosen", "rejected"}, implicit-prompt
conversations, LLaMA-Factory's sharegpt / alpaca ranking formats), plus TRL's optional "margin"
column (a number per pair). Each row is the whole conversation rendered with the model folder's
chat template, as TRL's RewardTrainer tokenizes it; its reward is the `score` head (hidden -> 1, no
bias) on the last non-pad token, as transformers' Qwen2/Qwen3ForSequenceClassification compute it.

Loss (TRL 1.16's RewardTrainer): -log σ(r_chosen - r_rejected - margin), mean over pairs, plus
--center-rewards-coefficient c x mean((r_chosen + r_rejected)²). metrics.jsonl carries TRL's names:
accuracy (chosen scored above rejected), margin, mean_reward; the held-out accuracy before training
is the row with "when": "before training".

--finetuning lora (default): LoRA adapters on the decoder and the score head trained in full (PEFT
modules_to_save=["score"], task_type SEQ_CLS); --qlora: the frozen base in NF4; --finetuning full:
every parameter. Writes into --out: adapter/ (PEFT, loads with PeftModel over
AutoModelForSequenceClassification), merged/ (a complete HF ...ForSequenceClassification folder with
the tokenizer: AutoModelForSequenceClassification loads it; GRPO takes it as --reward DIR),
checkpoints/, metrics.jsonl, run.json. With --finetuning full: model/ (the trained classifier) and merged/.

With no --data, the pairs come from the demo's SFT set (each question's real answer against the
answer to a different question), so the held-out accuracy rises visibly.
"""

from __future__ import annotations

import json

from cli import flags, inputs, options, outdir, runtime
from cli.console import Timer, list_outputs, log, print_training_curve
from cli.errors import UsageError, run_main
from data import preference_collate, preference_datasets
from models.qwen.tokenizer import load_tokenizer

BEFORE = "before training"


def build_parser() -> flags.Parser:
    return options.parser("reward", __doc__)


def main(argv=None) -> int:
    args, given = flags.parse(build_parser(), argv, stage="reward")
    flags.check_training_flags(args)
    if args.finetuning == "full-then-lora":
        raise UsageError("--finetuning full-then-lora: a reward model trains LoRA adapters with the score head "
                         "(--finetuning lora) or every parameter (--finetuning full)")
    timer = Timer()

    # ---- inputs, all checked before anything loads or is written
    given_inputs = inputs.pair_inputs(args, given, "reward")
    model_dir, data_paths, eval_path, changed = (given_inputs.model_dir, given_inputs.data_paths,
                                                 given_inputs.eval_path, given_inputs.changed)
    inputs.check_max_prompt_len(args, "the answers need")
    out = outdir.claim_training_run(args, "reward", model_dir, data_paths, eval_path)

    mode = "full" if args.finetuning == "full" else "QLoRA" if args.qlora else "LoRA"
    log(f"== qwen-tune stage 3: reward model (Bradley-Terry, {mode}) ==")
    if changed:
        log(f"embedded-default model detected; demo settings (flags you give win): {' '.join(changed)}")
    if not args.data:
        log(f"pairs derived from the demo's SFT set (real answer vs the answer to another question): {data_paths[0]}")
    tok, tok_source = load_tokenizer(model_dir)
    log(f"tokenizer: {tok_source}; chat template: {getattr(tok, 'chat_template_source', 'ChatML')}")
    runtime.check_vocab(model_dir, tok)

    # ---- data (encoded before the model loads): whole rendered conversations, as TRL tokenizes them
    train_ds, eval_ds, info = preference_datasets(data_paths, tok, max_len=args.max_len,
                                                  max_prompt_len=args.max_prompt_len, eval_path=eval_path,
                                                  eval_fraction=args.eval_fraction, seed=args.seed,
                                                  chat_template_kwargs=args.chat_template_kwargs, keep_tail=True)
    log(f"data: {info}")

    # ---- model: the causal LM with its head replaced by a fresh score head
    from models.qwen.score import to_sequence_classifier
    from models.qwen.special_tokens import ENDOFTEXT_ID

    model = runtime.load_model(model_dir, args.dtype, qlora=args.qlora)
    model.use_chat_eos()
    runtime.seed_everything(args.seed)
    try:
        model = to_sequence_classifier(model, num_labels=1, seed=args.seed)
    except ValueError as e:
        raise UsageError(f"--model {model_dir}: {e}") from None
    model.config.pad_token_id = ENDOFTEXT_ID   # what preference_collate pads with (TRL: the tokenizer's pad)
    _prepare(model, args)
    trainable, total = runtime.parameter_counts(model)
    what = "all parameters" if args.finetuning == "full" else \
        f"LoRA r={args.lora_r} alpha={args.lora_alpha:g} + the score head"
    log(f"model: {model_dir}, dtype {args.dtype}{', base in NF4' if args.qlora else ''}; {what}: "
        f"{trainable:,} trainable of {total:,} parameters")

    from train.reward_model import RewardObjective

    objective = RewardObjective(center_rewards_coefficient=args.center_rewards_coefficient)
    chat_tok = tok.set_eos("<|im_end|>")
    trainer = runtime.build_trainer(model, args, out, train_ds, eval_ds, tokenizer=chat_tok, objective=objective,
                                    collate_fn=preference_collate, say=log)
    before = trainer.evaluate() if eval_ds is not None else None
    if before:
        log(f"held-out before: {_line(before)}")

    summary = trainer.fit()
    print_training_curve(out, "Bradley-Terry loss per pair")
    after = summary["final_eval"]
    if before:
        _log_before(out, before)
    if before and after:
        log(f"\nheld-out after:  {_line({k[4:]: v for k, v in after.items() if k.startswith('val_')})}")

    if not args.no_merge:
        _save_merged(model, model_dir, out, args, chat_tok)
    log(f"\noutputs ({timer}):")
    log(list_outputs(out))
    log(f"  training summary: {runtime.summary_line(summary)}")
    log(f"\nnext: in transformers, AutoModelForSequenceClassification.from_pretrained('{out / 'merged'}'); "
        f"as a GRPO reward: python examples/grpo.py --reward {out / 'merged'}")
    return 0


def _prepare(model, args) -> None:
    """Seed, gradient checkpointing, and what trains: LoRA + the score head in full (PEFT's
    modules_to_save), or every parameter."""
    import lora

    model.enable_gradient_checkpointing(not args.no_grad_checkpointing)
    if args.finetuning == "full":
        model.requires_grad_(True)
        return
    settings = runtime.lora_settings(args)
    settings.modules_to_save = ["score"]
    try:
        lora.inject(model, **settings.inject_kwargs())
    except ValueError as e:
        raise UsageError(f"--lora-targets {args.lora_targets}: {e}") from None


def _save_merged(model, model_dir, out, args, tokenizer) -> None:
    """--out/merged: a complete ...ForSequenceClassification folder (adapters folded in; after
    QLoRA into the original 16-bit base, read again)."""
    import lora
    from models.qwen import save
    from models.qwen.score import to_sequence_classifier
    from train import distributed

    if not distributed.is_main():
        return
    if args.qlora:
        pad = model.config.pad_token_id
        model = to_sequence_classifier(runtime.load_model(model_dir, args.dtype).use_chat_eos(), num_labels=1)
        model.config.pad_token_id = pad
        lora.load(model, out / "adapter")
    if lora.has_adapters(model):
        lora.merge(model)
    save(model, out / "merged", tokenizer=tokenizer)


def _log_before(out, before: dict) -> None:
    """The held-out result before training into metrics.jsonl (step 0, once: a resumed run keeps it)."""
    from train import distributed

    if not distributed.is_main():
        return
    path = out / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] \
        if path.exists() else []
    if any(r.get("when") == BEFORE for r in rows):
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": 0, "when": BEFORE, **{f"val_{k}": v for k, v in before.items()}}) + "\n")


def _line(result: dict) -> str:
    """One line of the reward metrics of an evaluation (TRL's names)."""
    return (f"loss {result['loss']:.4f}, accuracy {result['accuracy']:.3f}, margin {result['margin']:.4f}, "
            f"mean_reward {result['mean_reward']:.4f} over {result['pairs']} pairs")


if __name__ == "__main__":
    run_main(main)
