"""Guards: a poisoned batch stops the run naming step/micro-batch/parameter; skip policy; the
"nothing trains" check; fp16 loss scaling; evaluation against transformers."""

import json
import math

import pytest
import torch

import lora
from models.qwen import Qwen, QwenConfig, load
from tests.helpers import hf_model, save_hf_model
from train import NonFiniteError, NothingTrainsError, Trainer, TrainConfig

VOCAB = 64
POISON = 13  # token id whose embedding row we set to NaN


def tiny(seed=0, adapters=True) -> Qwen:
    """A tiny untied model (the NaN row poisons the input side only), with LoRA r=2 on every
    linear unless adapters=False."""
    torch.manual_seed(seed)
    model = Qwen(QwenConfig.preset("tiny", vocab_size=VOCAB, tie_word_embeddings=False))
    if adapters:
        lora.inject(model, r=2, alpha=16, dropout=0.0)
    return model


def data(n=12, poison_at=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(0, VOCAB, (8 + i % 5,), generator=g)
        ids[ids == POISON] = POISON + 1
        if i in (poison_at or ()):
            ids[3] = POISON
        out.append({"input_ids": ids})
    return out


def cfg(tmp_path, **kw):
    base = dict(out_dir=str(tmp_path), max_steps=6, batch_size=2, grad_accum=2, dtype="fp32", progress=False,
                shuffle=False, lr=1e-2, pad_id=0)
    base.update(kw)
    return TrainConfig(**base)


def poison(model):
    with torch.no_grad():
        model.model.embed_tokens.weight[POISON] = float("nan")


def test_poisoned_batch_stops_naming_step_micro_batch_and_parameter(tmp_path):
    model = tiny()
    poison(model)
    # shuffle off, batch 2 x accum 2: example 11 is in step 3, micro-batch 1 (0-based) -> "2 of 2"
    trainer = Trainer(model, cfg(tmp_path), data(poison_at={11}))
    with pytest.raises(NonFiniteError, match=r"non-finite loss at step 3, micro-batch 2 of 2; first non-finite "
                                             r"parameter: model\.embed_tokens\.weight") as e:
        trainer.fit()
    assert e.value.step == 3
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]      # stopped before training on it


def test_skip_policy_skips_then_aborts_after_k_in_a_row(tmp_path):
    model = tiny()
    poison(model)
    # example 2 is in step 1 of each epoch (3 steps per epoch, shuffle off): skipped twice, not in a row
    with pytest.warns(UserWarning, match="step 1, micro-batch 2 of 2.*skipped") as record:
        summary = Trainer(model, cfg(tmp_path / "a", nan_policy="skip", max_bad_steps=2), data(poison_at={2})).fit()
    assert any("step 4, micro-batch 2 of 2" in str(w.message) for w in record)
    assert summary["skipped_steps"] == 2 and summary["steps"] == 6
    assert all(torch.isfinite(p).all() for n, p in model.named_parameters() if p.requires_grad)
    model = tiny()
    poison(model)
    with pytest.warns(UserWarning):
        with pytest.raises(NonFiniteError, match=r"step 2, micro-batch 1 of 2.*2 bad steps in a row"):
            Trainer(model, cfg(tmp_path / "b", nan_policy="skip", max_bad_steps=2), data(poison_at={2, 4})).fit()


def test_nothing_trains_is_an_error_after_the_first_step(tmp_path):
    model = tiny(adapters=False)
    lora.inject(model, r=2, alpha=4)
    lora.set_adapters_enabled(model, False)     # adapters present but unused: they get no gradient
    with pytest.raises(NothingTrainsError, match=r"step 1, micro-batch 1: .*received no gradient, first 'model\.layers\.0\..*lora_A"):
        Trainer(model, cfg(tmp_path), data()).fit()


def test_one_adapter_without_gradient_is_named(tmp_path):
    model = tiny(adapters=False)
    lora.inject(model, r=2, alpha=4)
    model.get_submodule("model.layers.1.mlp.down_proj").adapters_enabled = False   # only this one is unused
    with pytest.raises(NothingTrainsError, match=r"step 1: 2 trainable parameter\(s\) received no gradient, "
                                                 r"first 'model\.layers\.1\.mlp\.down_proj\.lora_A\.weight'"):
        Trainer(model, cfg(tmp_path), data()).fit()


def test_lora_b_that_does_not_move_is_an_error(tmp_path):
    model = tiny(adapters=False)
    lora.inject(model, r=2, alpha=4)
    trainer = Trainer(model, cfg(tmp_path), data())
    b_params = {id(p) for n, p in model.named_parameters() if "lora_B" in n}
    real_step = trainer.optimizer.step

    def step_that_drops_b(*a, **k):     # an optimizer that silently skips B (grads present, B frozen)
        for group in trainer.optimizer.param_groups:
            for p in group["params"]:
                if id(p) in b_params:
                    p.grad = None
        return real_step(*a, **k)
    trainer.optimizer.step = step_that_drops_b
    with pytest.raises(NothingTrainsError, match=r"step 1: \d+ of \d+ LoRA B matrices did not change.*lora_B"):
        trainer.fit()


def test_fp16_uses_loss_scaling_and_warns(tmp_path):
    model = tiny()
    with pytest.warns(UserWarning, match="Qwen was trained in bf16"):
        trainer = Trainer(model, cfg(tmp_path, dtype="fp16", max_steps=2), data())
    assert trainer.scaler.enabled and trainer.scaler.scale == 2.0**16
    summary = trainer.fit()
    assert summary["steps"] == 2 and math.isfinite(summary["final_loss"])
    state = json.loads((tmp_path / "checkpoints" / "step-2" / "state.json").read_text())
    assert state["scaler"]["enabled"] is True


def test_bf16_autocast_on_cpu_trains(tmp_path):
    model = tiny()
    trainer = Trainer(model, cfg(tmp_path, dtype="bf16", max_steps=2), data())
    assert trainer.autocast_dtype == torch.bfloat16
    assert math.isfinite(trainer.fit()["final_loss"])


def test_evaluate_matches_transformers_loss_and_ppl(tmp_path):
    ref = hf_model("qwen2", seed=5)
    model = load(save_hf_model(ref, tmp_path / "m"), dtype=torch.float32)
    examples = [{"input_ids": torch.randint(0, 320, (n,), generator=torch.Generator().manual_seed(n))}
                for n in (5, 9, 14)]
    trainer = Trainer(model, cfg(tmp_path / "o", mode="full", grad_checkpointing=False, eval_batch_size=2),
                      examples, eval_dataset=examples)
    result = trainer.evaluate()
    nll, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:     # HF per sequence: mean loss x its tokens
            ids = ex["input_ids"][None]
            nll += float(ref(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    assert result["tokens"] == count
    assert abs(result["loss"] - nll / count) <= 1e-5 * abs(nll / count)
    assert result["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_bad_config_names_the_option():
    from train import ConfigError

    for kw, word in [({"grad_accum": 0}, "grad_accum"), ({"mode": "qlora"}, "mode"), ({"dtype": "fp8"}, "dtype"),
                     ({"epochs": 1, "max_steps": 3}, "not both"), ({"warmup_steps": 2, "warmup_ratio": 0.1}, "not both"),
                     ({"mode": "full-then-lora"}, "full_fraction"), ({"nan_policy": "ignore"}, "nan_policy")]:
        with pytest.raises(ConfigError, match=word):
            TrainConfig(**kw)


def test_bf16_model_runs_directly_with_fp32_optimizer_state(tmp_path):
    model = tiny(adapters=False).to(torch.bfloat16)
    trainer = Trainer(model, cfg(tmp_path, dtype="bf16", max_steps=2, mode="full"), data())
    assert trainer.autocast_dtype is None              # no autocast: the model already is bf16
    assert math.isfinite(trainer.fit()["final_loss"])
    state = trainer.optimizer.state[model.model.embed_tokens.weight]
    assert state["master"].dtype == torch.float32 and state["exp_avg"].dtype == torch.float32
    assert torch.equal(state["master"].to(torch.bfloat16), model.model.embed_tokens.weight.detach())
    with pytest.raises(ValueError, match=r"dtype='fp32' but the model's parameters are torch.bfloat16"):
        Trainer(tiny().to(torch.bfloat16), cfg(tmp_path / "x", dtype="fp32"), data())


def tiny_moe(tmp_path, **targets):
    """A transformers-written Qwen3-MoE (6 experts, top 1) loaded by us, LoRA on every linear
    (or `targets=`): a step of 8-12 tokens leaves some experts unrouted."""
    path = save_hf_model(hf_model("qwen3_moe", num_experts_per_tok=1, vocab_size=VOCAB), tmp_path / "moe")
    return lora.inject(load(path, dtype=torch.float32), r=2, alpha=4, **targets)


def test_unrouted_experts_pass_the_first_step_check_and_train(tmp_path):
    from models.qwen.moe import SparseMoeBlock

    model = tiny_moe(tmp_path)
    rows = []   # tokens each expert received, forward by forward (the router's choices: the experts run grouped)
    for block in [m for m in model.modules() if isinstance(m, SparseMoeBlock)]:
        block.gate.register_forward_hook(
            lambda m, a, o: rows.extend(torch.bincount(o[2].reshape(-1), minlength=m.weight.shape[0]).tolist()))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    summary = Trainer(model, cfg(tmp_path / "o", batch_size=1, grad_accum=1, max_steps=3), data(n=3)).fit()
    assert summary["steps"] == 3
    experts_per_forward = 2 * model.config.num_experts
    assert 0 in rows[:experts_per_forward]     # step 1 left an expert without a token
    moved = {n: not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters() if "lora_B" in n}
    assert all(v for n, v in moved.items() if ".experts." not in n)   # every dense adapter trained


def test_a_dense_adapter_cut_off_from_the_loss_is_named_in_a_moe_model(tmp_path):
    """Its gradient is present but exactly zero (scale 0: the output never reaches the loss): only a
    routed expert may have that."""
    model = tiny_moe(tmp_path)
    model.get_submodule("model.layers.1.self_attn.v_proj").scale = 0.0
    with pytest.raises(NothingTrainsError, match=r"step 1: 1 of \d+ LoRA B matrices received an all-zero gradient, "
                                                 r"first 'model\.layers\.1\.self_attn\.v_proj\.lora_B\.weight'"):
        Trainer(model, cfg(tmp_path / "o", batch_size=1, grad_accum=1), data(n=3)).fit()


def test_every_expert_adapter_cut_off_is_an_error(tmp_path):
    """Adapters on the experts only, none reaching the loss: each zero alone could be an idle
    expert, all of them at once cannot."""
    model = tiny_moe(tmp_path, targets=["gate_proj", "up_proj", "down_proj"])
    for module in lora.adapter_modules(model).values():
        module.scale = 0.0
    with pytest.raises(NothingTrainsError, match=r"step 1: \d+ of \d+ LoRA B matrices received an all-zero gradient"):
        Trainer(model, cfg(tmp_path / "o", batch_size=1, grad_accum=1), data(n=3)).fit()
