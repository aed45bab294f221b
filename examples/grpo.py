"""Stage 4: reinforcement learning with verifiable rewards: GRPO and its family (DAPO, Dr. GRPO,
BNPO; GSPO with --importance-sampling-level sequence), as TRL's GRPOTrainer.

    python examples/grpo.py                       # runs/dpo/merged (else runs/sft/merged) on the demo task -> runs/grpo
    python examples/grpo.py --model Qwen2.5-0.5B-Instruct --qlora --data prompts.jsonl --reward accuracy \\
        --num-generations 8 --max-completion-length 256 --batch-size 8 --grad-accum 4
    qwen-tune grpo --config grpo.yaml             # TRL GRPOConfig keys (num_generations, beta, loss_type, ...)

Data: .jsonl rows with a `prompt`: text (completed as it is) or a message list (rendered with the
model's chat template and its generation prompt; completions are then assistant messages). Every
other column (e.g. `answer`) is passed to the reward functions by name, as TRL does.

Rewards (--reward, repeatable, --reward-weights): `accuracy` (the last \\boxed{} or number of the
completion equals the `answer` column), `format` (<think>...</think><answer>...</answer>),
FILE.py:NAME (a function fn(prompts, completions, completion_ids, **columns) -> list[float | None]),
or a reward-model folder written by examples/reward.py.

Each step: G completions per prompt are sampled with the KV cache (seeded: the same command samples
the same completions, --resume continues them), stopped at <|im_end|> / <|endoftext|>, scored, given
group-relative advantages, and the clipped policy loss is minimised (log-probs through the chunked
head). --batch-size and --grad-accum count completions (TRL): batch x accum x processes must be a
multiple of G. The reference of --beta is the model with its adapters disabled (no second copy);
--finetuning full trains every parameter with --beta 0 only (there is no adapters-off reference).

Writes into --out: adapter/ (PEFT format) and merged/ with LoRA / QLoRA, or model/ with
--finetuning full; checkpoints/, metrics.jsonl (TRL's names: reward, reward_std,
rewards/<name>/mean, completions/mean_length, completions/clipped_ratio, kl,
clip_ratio/region_mean, entropy), completions.jsonl (--log-completions), run.json.

With no --data: the demo's "What is the signature of `x`?" questions, rewarded for a signature
answer's form (demo/grpo_task.py: starts as code, ends its turn in time, names the object). The
held-out reward (--held-out-samples seeded samples for each of --sample-prompts held-out prompts, the
same draws before and after) is printed before and after training.
"""

from __future__ import annotations

import math
from pathlib import Path

from cli import flags, inputs, options, outdir, paths, runtime
from cli.console import Timer, list_outputs, log, print_training_curve
from cli.errors import UsageError, run_main


def build_parser() -> flags.Parser:
    return options.parser("grpo", __doc__)


def reward_functions(specs, device: str, dtype: str):
    """(functions, names) of the --reward specs: built-ins, FILE.py:NAME, or a reward-model folder."""
    from train.rewards import load_reward_function

    fns, names = [], []
    for spec in specs:
        if Path(spec).is_dir():
            try:
                from train.reward_model import reward_function
            except ImportError:
                raise UsageError(f"--reward {spec}: a reward-model folder needs train.reward_model "
                                 "(the reward-model stage, examples/reward.py), which this installation lacks") from None
            fn = reward_function(spec, device=device, dtype=dtype)
            name = Path(spec).name
        else:
            try:
                fn = load_reward_function(spec)
            except ValueError as e:
                raise UsageError(f"--reward: {e}") from None
            name = getattr(fn, "__name__", type(fn).__name__)
        fns.append(fn)
        names.append(name)
    return fns, names


def default_model() -> Path:
    dpo = paths.DPO_OUT / "merged"
    return dpo if paths.is_model(dpo) else paths.SFT_OUT / "merged"


def main(argv=None) -> int:
    args, given = flags.parse(build_parser(), argv, stage="grpo")
    flags.check_training_flags(args)
    if args.finetuning == "full-then-lora":
        raise UsageError("--finetuning full-then-lora is not a GRPO mode: use lora (default) or full")
    if args.finetuning == "full" and args.beta > 0:
        raise UsageError(f"--finetuning full with --beta {args.beta:g}: the KL reference is the model with its "
                         "adapters disabled, which full fine-tuning does not have; use --finetuning lora or --beta 0")
    timer = Timer()

    # ---- inputs, all checked before anything loads or is written
    model_dir = inputs.model_dir_or_default(args.model, default_model(), "examples/sft.py or examples/dpo.py")
    from demo.base_model import is_demo_shape

    demo_task = not args.data
    if args.data:
        data_paths, eval_path = inputs.jsonl_data(args)
        if not args.reward:
            raise UsageError("--data needs at least one --reward (accuracy, format, FILE.py:NAME or a reward-model "
                             "folder)")
    else:
        from demo import corpus as demo_corpus
        from demo.grpo_task import prompts_file

        corpus = demo_corpus.build()
        data_paths, eval_path = [prompts_file(corpus.sft_train)], prompts_file(corpus.sft_eval)
    changed = options.apply_embedded(args, given, "grpo") if is_demo_shape(model_dir) else []
    from train import distributed

    world = distributed.world_size()
    G, global_batch = args.num_generations, args.batch_size * args.grad_accum * world
    if global_batch % G:
        raise UsageError(f"--batch-size {args.batch_size} x --grad-accum {args.grad_accum}"
                         + (f" x {world} processes" if world > 1 else "")
                         + f" = {global_batch} completions per step: must be a multiple of --num-generations {G}")
    if args.reward_weights is not None and len(args.reward_weights) != max(len(args.reward or []), 1):
        raise UsageError(f"--reward-weights: {len(args.reward_weights)} weights for {len(args.reward or [])} --reward")
    if args.temperature <= 0:
        raise UsageError("--temperature must be > 0 (log-probs are of softmax(logits / temperature))")
    device, dtype_name = runtime.device(), runtime.compute_dtype(args.dtype)
    if args.reward:
        fns, names = reward_functions(args.reward, device, dtype_name)
    else:
        from demo.grpo_task import signature_reward

        fns, names = [signature_reward], ["signature_reward"]
    out = outdir.claim_training_run(args, "grpo", model_dir, data_paths, eval_path)

    log(f"== qwen-tune stage 4: GRPO ({args.loss_type}, {args.importance_sampling_level}-level ratios, "
        f"{'QLoRA' if args.qlora else 'LoRA' if args.finetuning == 'lora' else 'full'}) ==")
    if changed:
        log(f"embedded-default model detected; demo settings (flags you give win): {' '.join(changed)}")
    if demo_task:
        log(f"demo task: signature questions from the demo's SFT set ({data_paths[0]}), reward signature_reward")
    from models.qwen.tokenizer import load_tokenizer

    tok, tok_source = load_tokenizer(model_dir)
    log(f"tokenizer: {tok_source}; chat template: {getattr(tok, 'chat_template_source', 'ChatML')}")
    runtime.check_vocab(model_dir, tok)

    # ---- prompts (encoded before the model loads)
    from data.prompts import load_prompts

    prompts, report = load_prompts(data_paths, tok, args.max_len, args.chat_template_kwargs)
    held_out = load_prompts([eval_path], tok, args.max_len, args.chat_template_kwargs)[0] if eval_path else []
    held_out = held_out[: args.sample_prompts]
    log(f"prompts: {len(prompts)} ({report.truncated.get('prompt-truncated', 0)} truncated to --max-len "
        f"{args.max_len}); held-out: {len(held_out)}; rewards: {', '.join(names)}")

    # ---- model
    model = runtime.load_model(model_dir, args.dtype, qlora=args.qlora)
    model.use_chat_eos()
    runtime.prepare_for_training(model, args)
    trainable, total = runtime.parameter_counts(model)
    log(f"model: {model_dir}, dtype {args.dtype}{', base in NF4' if args.qlora else ''}: "
        f"{trainable:,} trainable of {total:,} parameters")

    from models.qwen import CHAT_STOP_IDS
    from train.grpo_source import GRPOObjective, GRPOSettings, GRPOSource, completion_slots

    settings = GRPOSettings(
        num_generations=G, max_completion_length=args.max_completion_length, temperature=args.temperature,
        top_p=args.top_p, top_k=args.top_k, beta=args.beta, epsilon=args.epsilon, epsilon_high=args.epsilon_high,
        loss_type=args.loss_type, importance_sampling_level=args.importance_sampling_level,
        scale_rewards=args.scale_rewards, num_iterations=args.num_iterations, reward_weights=args.reward_weights,
        log_completions=str(out / "completions.jsonl") if args.log_completions else None)
    eos_ids = list(dict.fromkeys([*CHAT_STOP_IDS, *model.config.eos_ids()]))
    if args.max_steps is None:   # an epoch = every prompt G times; each generation trains μ steps
        args.max_steps = max(1, math.ceil(args.epochs * len(prompts) * G / global_batch)) * args.num_iterations
    source = GRPOSource(prompts, fns, settings, tokenizer=tok, eos_ids=eos_ids, pad_id=model.config.pad_token_id,
                        seed=args.seed, reward_names=names)
    chat_tok = tok.set_eos("<|im_end|>")
    trainer = runtime.build_trainer(model, args, out, completion_slots(len(prompts), G), None, tokenizer=chat_tok,
                                    objective=GRPOObjective(settings), collate_fn=lambda rows: {}, say=log)
    source.attach(trainer)
    trainer.batch_source = source

    K = args.held_out_samples
    what = (f"{K} samples at temperature {args.temperature:g}" if K else "greedy") + f", {len(held_out)} prompts"
    before = held_out_reward(model, source, held_out, K) if held_out else None
    if before is not None:
        log(f"held-out reward before ({what}): {before:.3f}")
    summary = trainer.fit()
    print_training_curve(out, "GRPO loss")
    if before is not None:
        after = held_out_reward(model, source, held_out, K)
        log(f"held-out reward after ({what}):  {after:.3f}  (before {before:.3f}, change {after - before:+.3f})")

    if not args.no_merge and args.finetuning != "full" and trainer.dist.is_main:
        runtime.save_merged(model, model_dir, out, args.dtype, args.qlora, tokenizer=chat_tok)
    log(f"\noutputs ({timer}):")
    log(list_outputs(out))
    log(f"  training summary: {runtime.summary_line(summary)}")
    if args.finetuning != "full" and args.no_merge:
        log(f"\nnext: python examples/generate.py --model {model_dir} --adapter {out / 'adapter'}   "
            "(chat with the tuned model)")
    else:   # full fine-tuning writes the whole model into --out/model (as sft.py)
        tuned = out / ("model" if args.finetuning == "full" else "merged")
        log(f"\nnext: python examples/generate.py --model {tuned}   (chat with the tuned model)")
    return 0


def held_out_reward(model, source, prompts, samples: int = 0) -> float:
    """Mean weighted reward on `prompts`: of `samples` completions each, drawn with the training's
    sampling settings from generators seeded by (--seed, "held-out", prompt, sample), so that the
    figure before and after training is of the same draws; or, with samples=0, of one greedy
    completion each. Batched, with the KV cache."""
    import torch

    from models.qwen.generation import generate
    from train.grpo import reward_table, weighted_rewards
    from train.grpo_source import seed_of

    k = max(samples, 1)
    rows = [p for p in prompts for _ in range(k)]
    T = max(len(p["prompt_ids"]) for p in rows)
    ids = torch.full((len(rows), T), source.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(rows):
        ids[i, T - len(p["prompt_ids"]):] = torch.tensor(p["prompt_ids"])
        mask[i, T - len(p["prompt_ids"]):] = 1
    dev = next(model.parameters()).device
    s = source.s
    sampling = dict(temperature=0.0)
    if samples:
        sampling = dict(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                        generator=[torch.Generator(device=dev).manual_seed(seed_of(source.seed, "held-out", i // k, i % k))
                                   for i in range(len(rows))])
    was_training = model.training
    model.eval()
    try:
        out = generate(model, ids.to(dev), max_new_tokens=s.max_completion_length, eos_ids=source.eos_ids,
                       attention_mask=mask.to(dev), pad_id=source.pad_id, **sampling)[:, T:].cpu()
    finally:
        model.train(was_training)
    comp_ids, texts = [], []
    for row in out.tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in source.eos_ids), len(row))
        comp_ids.append(row[:cut])
        texts.append(source.tok.decode([t for t in row[:cut] if t not in source.eos_ids], skip_special_tokens=True))
    completions = [[{"role": "assistant", "content": t}] if p["chat"] else t for p, t in zip(rows, texts)]
    keys = sorted({key for p in rows for key in p["columns"]})
    table = reward_table(source.functions, [p["prompt"] for p in rows], completions, comp_ids,
                         **{key: [p["columns"].get(key) for p in rows] for key in keys})
    return float(torch.nanmean(weighted_rewards(table, source.weights)))


if __name__ == "__main__":
    run_main(main)
