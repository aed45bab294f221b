"""cli/options.py, the one declaration of each script's options: what argparse, --help and --config
are generated from, checked against the key sets the scripts accepted before it (the contract)."""

from __future__ import annotations

import json

import pytest

from cli import flags, options

OLD_KEYS = {   # examples/<stage>.py's --config keys (argparse dests) on main before cli/options.py
    "cpt": set("""
        batch_size block_size data dtype epochs eval_every eval_fraction finetuning fsdp full_fraction
        grad_accum keep_last log_every long_context_from long_context_tile lora_alpha lora_dropout lora_r
        lora_targets lr lr_scheduler max_grad_norm max_steps model no_document_mask offload_activations no_grad_checkpointing out overwrite qlora report_to
        resume sample_prompt sample_temperature sample_tokens save_every seed text_field use_dora use_rslora
        warmup_ratio warmup_steps weight_decay
    """.split()),
    "sft": set("""
        batch_size chat_template_kwargs data dtype epochs eval_data eval_every eval_fraction finetuning
        format fsdp full_fraction grad_accum keep_last log_every long_context_from long_context_tile
        lora_alpha lora_dropout lora_r lora_targets lr lr_scheduler max_grad_norm max_len max_steps model
        no_grad_checkpointing no_merge offload_activations out overwrite
        qlora report_to resume sample_questions sample_tokens save_every seed use_dora use_rslora
        warmup_ratio warmup_steps weight_decay
    """.split()),
    "dpo": set("""
        batch_size beta chat_template_kwargs data dtype epochs eval_data eval_every eval_fraction finetuning
        fsdp full_fraction grad_accum keep_last label_smoothing log_every long_context_from
        long_context_tile lora_alpha lora_dropout lora_r lora_targets loss lr lr_scheduler max_grad_norm
        max_len max_prompt_len max_steps model no_grad_checkpointing no_merge offload_activations out overwrite qlora reference report_to resume sample_questions
        sample_tokens save_every seed simpo_gamma use_dora use_rslora warmup_ratio warmup_steps weight_decay
    """.split()),
    "reward": set("""
        batch_size center_rewards_coefficient chat_template_kwargs data dtype epochs eval_data eval_every
        eval_fraction finetuning fsdp full_fraction grad_accum keep_last log_every lora_alpha lora_dropout lora_r
        lora_targets lr lr_scheduler max_grad_norm max_len max_prompt_len max_steps model no_grad_checkpointing
        no_merge out overwrite qlora report_to resume save_every seed use_dora use_rslora warmup_ratio
        warmup_steps weight_decay
        long_context_from long_context_tile offload_activations
    """.split()),
    "grpo": set("""
        batch_size beta chat_template_kwargs data dtype epochs epsilon epsilon_high eval_data eval_every
        eval_fraction finetuning fsdp full_fraction grad_accum importance_sampling_level keep_last
        log_completions log_every lora_alpha lora_dropout lora_r lora_targets loss_type lr lr_scheduler
        max_completion_length max_grad_norm max_len max_steps model no_grad_checkpointing no_merge
        held_out_samples num_generations num_iterations out overwrite qlora report_to resume reward reward_weights
        sample_prompts save_every scale_rewards seed temperature top_k top_p use_dora use_rslora warmup_ratio
        warmup_steps weight_decay
        long_context_from long_context_tile offload_activations
    """.split()),
    "kto": set("""
        batch_size beta chat_template_kwargs data desirable_weight dtype epochs eval_data eval_every eval_fraction
        finetuning fsdp full_fraction grad_accum keep_last log_every lora_alpha lora_dropout lora_r lora_targets
        loss_type lr lr_scheduler max_grad_norm max_len max_prompt_len max_steps model no_grad_checkpointing
        no_merge out overwrite qlora report_to resume sample_questions sample_tokens save_every seed
        undesirable_weight use_dora use_rslora warmup_ratio warmup_steps weight_decay
        long_context_from long_context_tile offload_activations
    """.split()),
    "merge": set("""
        adapter dtype gguf into max_shard_size model out overwrite qlora
    """.split()),
    "evaluate": set("""
        adapter batch_size chat_template_kwargs domain_data dtype eval_fraction forgetting_threshold
        gen_batch_size general_data instructions max_instructions max_length max_new_tokens max_tokens
        metrics model out qlora stride text_field
    """.split()),
    "generate": set("""
        adapter chat_template_kwargs compare dtype max_new_tokens mode model prompt qlora seed system
        temperature top_k top_p
    """.split()),
    "export": set("""
        gguf model name overwrite type
    """.split()),
    "residual": set("""
        attention_scale base chat dtype embeddings_scale mlp_scale no_hash norms_scale out overwrite scale
        skip skip_embeddings special_rows target
    """.split()),
    "extend_vocab": set("""
        data max_chars max_tokens min_frequency model out overwrite rank sp_model_type sp_vocab_size
        text_field token tokens
    """.split()),
}
OLD_LF_KEYS = set("""
    bf16 cutoff_len dataset dataset_dir disable_gradient_checkpointing dpo_label_smoothing eval_dataset
    eval_steps finetuning_type fp16 gradient_accumulation_steps gradient_checkpointing kto_chosen_weight
    kto_rejected_weight learning_rate logging_steps lora_alpha lora_dropout lora_rank lora_target lr_scheduler_type max_grad_norm
    max_steps model_name_or_path num_train_epochs optim output_dir overwrite_output_dir
    per_device_train_batch_size pref_beta pref_loss pure_bf16 quantization_bit quantization_method
    quantization_type report_to resume_from_checkpoint save_steps save_total_limit seed simpo_gamma
    stage template use_dora use_rslora val_size warmup_ratio warmup_steps weight_decay
""".split())
# A value for each option a LLaMA-Factory key sets unchanged, different from its default.
ALIAS_VALUES = {
    "model": "m", "data": ["a.txt"], "eval_fraction": 0.1, "out": "o", "lora_r": 4, "lora_alpha": 12.0,
    "lora_dropout": 0.2, "use_rslora": True, "use_dora": True, "lr": 3e-4, "warmup_steps": 3, "warmup_ratio": 0.2,
    "epochs": 1.5, "max_steps": 9, "batch_size": 2, "grad_accum": 3, "max_grad_norm": 0.5, "weight_decay": 0.1,
    "seed": 7, "eval_every": 4, "save_every": 6, "keep_last": 3, "log_every": 2, "beta": 0.3, "label_smoothing": 0.1,
    "simpo_gamma": 0.7, "loss": "ipo", "block_size": 64, "max_len": 64, "desirable_weight": 1.3,
    "undesirable_weight": 0.8,
}
# The value each of those LLaMA-Factory keys is written with in a recipe (where it differs).
LF_VALUES = {"dataset": "a.txt", "val_size": 0.1, "cutoff_len": 64}


def _parse(stage, argv):
    return flags.parse(options.parser(stage, "test"), argv, stage=options.STAGES[stage].lf_stage)


@pytest.mark.parametrize("stage", sorted(OLD_KEYS))
def test_generated_config_keys_are_the_old_ones_and_every_option_is_in_help(stage):
    """The --config keys (our names) are exactly what main accepted; each declared option is a
    flag of the parser and appears in --help."""
    declared = options.STAGES[stage]
    assert declared.keys == OLD_KEYS[stage]
    p = options.parser(stage, "test")
    assert {a.dest for a in p._actions} - {"help", "config"} == declared.keys
    text = p.format_help()
    for o in declared.options:
        assert o.flag in text, o.flag


def test_generated_llama_factory_keys_are_the_old_ones():
    from cli import config_file

    assert set(config_file.LF_KEYS) == OLD_LF_KEYS
    assert config_file.LF_LIST_KEYS == {"lora_target", "report_to", "dataset", "eval_dataset"}
    assert config_file.LF_RIVALS == {"warmup_steps": "warmup_ratio", "epochs": "max_steps"}


@pytest.mark.parametrize("stage", ["cpt", "sft", "dpo", "reward", "kto"])
def test_a_config_key_and_its_llama_factory_alias_reach_the_same_option(stage, tmp_path):
    (tmp_path / "a.txt").write_text("x", encoding="utf-8")
    lf_stage = {"cpt": "pt", "reward": "rm"}.get(stage, stage)
    checked = set()
    for o in options.STAGES[stage].options:
        for alias in o.lf:
            if alias.translate is not None and alias.key not in LF_VALUES:
                continue   # a translation of its own (tests/cli/test_config_file.py)
            value = ALIAS_VALUES[o.name]
            ours, recipe = tmp_path / "ours.json", tmp_path / "recipe.json"
            ours.write_text(json.dumps({o.name.replace("_", "-"): value}), encoding="utf-8")
            recipe.write_text(json.dumps({"stage": lf_stage, alias.key: LF_VALUES.get(alias.key, value),
                                          "dataset_dir": str(tmp_path)}), encoding="utf-8")
            a, given_a = _parse(stage, ["--config", str(ours)])
            b, given_b = _parse(stage, ["--config", str(recipe)])
            want = [str(tmp_path / v) for v in value] if o.name == "data" else value
            assert (getattr(a, o.name), getattr(b, o.name)) == (value, want), (o.name, alias.key)
            assert o.name in given_a and o.name in given_b
            checked.add(o.name)
    assert {"lora_r", "lr", "batch_size", "max_len" if stage != "cpt" else "block_size"} <= checked


@pytest.mark.parametrize("spelling", [["--lr", "1e-3"], ["--lr=1e-3"], "config", "llama-factory"])
def test_a_flag_in_any_spelling_beats_the_embedded_default_which_beats_the_stage_default(spelling, tmp_path):
    """The embedded default (lr 2e-3 for the demo model) fills only what the user did not set;
    the stage's own recommendation (5e-5) is what it replaces."""
    assert options.SFT.embedded["lr"] == 2e-3 and options.SFT.recommended["lr"] == 5e-5
    if spelling == "config":
        (tmp_path / "c.yaml").write_text("lr: 1.0e-3\n", encoding="utf-8")
        spelling = ["--config", str(tmp_path / "c.yaml")]
    elif spelling == "llama-factory":
        (tmp_path / "c.yaml").write_text("stage: sft\nlearning_rate: 1.0e-3\n", encoding="utf-8")
        spelling = ["--config", str(tmp_path / "c.yaml")]
    args, given = _parse("sft", spelling)
    options.apply_embedded(args, given, "sft")
    assert args.lr == 1e-3 and "lr" in given
    args, given = _parse("sft", [])
    assert args.lr == 5e-5
    options.apply_embedded(args, given, "sft")
    assert args.lr == 2e-3 and "lr" not in given


def test_stage_recommendations_are_the_defaults_and_help_shows_them_once():
    for stage, (lr, alpha, epochs) in {"cpt": (1e-4, 16.0, 2.0), "sft": (5e-5, 32.0, 1.0),
                                       "dpo": (5e-6, 32.0, 1.0), "reward": (1e-4, 32.0, 1.0)}.items():
        args, _ = _parse(stage, [])
        assert (args.lr, args.lora_alpha, options.recommended_epochs(stage)) == (lr, alpha, epochs)
        text = " ".join(options.parser(stage, "test").format_help().split())
        assert text.count(f"passes over the data (default: {epochs:g})") == 1


def test_kto_reads_trl_kto_config_names(tmp_path):
    """A TRL KTOConfig's keys (its own names and the TrainingArguments ones it sets) reach our
    options, with our stage defaults for the rest (not LLaMA-Factory's)."""
    (tmp_path / "kto.yaml").write_text("beta: 0.2\ndesirable_weight: 1.5\nundesirable_weight: 0.7\n"
                                        "loss_type: apo_zero_unpaired\nmax_length: 512\nmax_prompt_length: 128\n"
                                        "learning_rate: 1.0e-6\nper_device_train_batch_size: 4\n"
                                        "gradient_accumulation_steps: 8\nnum_train_epochs: 2\n", encoding="utf-8")
    args, given = _parse("kto", ["--config", str(tmp_path / "kto.yaml")])
    assert (args.beta, args.desirable_weight, args.undesirable_weight, args.loss_type) == (0.2, 1.5, 0.7,
                                                                                           "apo_zero_unpaired")
    assert (args.max_len, args.max_prompt_len, args.lr, args.batch_size, args.grad_accum, args.epochs) == (
        512, 128, 1e-6, 4, 8, 2.0)
    assert args.lora_r == 16   # ours, not LLaMA-Factory's lora_rank 8
    (tmp_path / "lf.yaml").write_text("stage: kto\npref_beta: 0.3\nkto_chosen_weight: 1.2\n"
                                      "kto_rejected_weight: 0.9\n", encoding="utf-8")
    args, _ = _parse("kto", ["--config", str(tmp_path / "lf.yaml")])
    assert (args.beta, args.desirable_weight, args.undesirable_weight, args.lora_r) == (0.3, 1.2, 0.9, 8)
