"""train.phases: the FineTuningPlan the loop asks (phase at a step, the switch, what a checkpoint
keeps, resume into the LoRA phase), and the two-phase mode named in train/ by that module alone."""

import ast
import json
from pathlib import Path

import pytest
import torch

import lora
from models.qwen import Qwen, QwenConfig
from quant import quantize_model
from train import TrainConfig, Trainer
from train.config import MODES
from train.phases import FULL_THEN_LORA, FineTuningPlan

VOCAB = 64
SETTINGS = lora.LoRAConfig(r=2, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")


def tiny(seed=0) -> Qwen:
    torch.manual_seed(seed)
    return Qwen(QwenConfig.preset("tiny", vocab_size=VOCAB))


@pytest.mark.parametrize("total, fraction, full_steps", [(6, 0.5, 3), (4, 0.5, 2), (5, 0.5, 2), (7, 0.5, 4),
                                                         (10, 0.25, 2), (3, 0.1, 0)])
def test_two_phase_plan_switches_after_round_of_the_fraction(total, fraction, full_steps):
    """S = round(full_fraction x T) steps in full (Python's round: 2.5 -> 2, 3.5 -> 4), then LoRA;
    S = 0 starts in LoRA (the adapters injected before the first step)."""
    plan = FineTuningPlan.of(FULL_THEN_LORA, fraction, SETTINGS, total)
    assert plan.switch_step == full_steps
    assert [plan.phase_at(s) for s in range(total)] == ["full"] * full_steps + ["lora"] * (total - full_steps)
    # the loop's question before each update: the switch comes once, at step S, and never from "lora"
    phase, switched_at = plan.phase_at(0), []
    for step in range(total):
        if plan.switch_due(step, phase):
            switched_at.append(step)
            phase = "lora"
    assert switched_at == ([full_steps] if full_steps > 0 else [])
    assert not plan.switch_due(total - 1, "lora")
    assert (plan.saves_base("full"), plan.saves_base("lora"), plan.trains_base) == (False, True, True)


@pytest.mark.parametrize("mode, phase, trains_base", [("lora", "lora", False), ("full", "full", True)])
def test_single_phase_modes_never_switch(mode, phase, trains_base):
    plan = FineTuningPlan.of(mode, 0.0, None, 8)
    assert plan.switch_step is None and plan.trains_base == trains_base
    assert {plan.phase_at(s) for s in range(8)} == {phase}
    assert not any(plan.switch_due(s, phase) for s in range(8))
    assert not plan.saves_base(phase)


def test_two_phase_plan_needs_the_adapters_it_injects():
    with pytest.raises(ValueError, match="lora_config=lora.LoRAConfig"):
        FineTuningPlan.of(FULL_THEN_LORA, 0.5, None, 6)


def test_entering_the_lora_phase_on_a_fresh_model_injects_the_configured_adapters():
    """Resume mid-LoRA-phase: a fresh (adapter-less) model gets the same adapters as the run had,
    and only those train: the checkpoint's trainable.safetensors then fits it."""
    plan = FineTuningPlan.of(FULL_THEN_LORA, 0.5, SETTINGS, 6)
    model, reference = tiny(), tiny()
    plan.enter(model, "lora")
    lora.inject(reference, **SETTINGS.inject_kwargs())
    trainable = lambda m: sorted(n for n, p in m.named_parameters() if p.requires_grad)  # noqa: E731
    assert lora.has_adapters(model) and trainable(model) == trainable(reference)
    plan.enter(model, "lora")                                    # entering twice injects once
    assert trainable(model) == trainable(reference)
    with pytest.raises(ValueError, match="already holds LoRA adapters"):
        plan.enter(model, "full")


def test_full_phase_refuses_a_4bit_base_and_lora_mode_needs_something_trainable():
    with pytest.raises(ValueError, match="NF4-quantised"):
        FineTuningPlan.of("full", 0.0, None, 4).enter(quantize_model(tiny()), "full")
    frozen = tiny()
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing in the model is trainable"):
        FineTuningPlan.of("lora", 0.0, None, 4).enter(frozen, "lora")


def test_the_loop_follows_the_plan_across_a_half_step_switch(tmp_path):
    """5 steps at full_fraction 0.5: metrics.jsonl says 2 full steps then 3 LoRA steps (round(2.5) = 2),
    the last checkpoint keeps the moved base (model.safetensors) beside the adapter."""
    data = [{"input_ids": torch.randint(0, VOCAB, (6,), generator=torch.Generator().manual_seed(i))} for i in range(4)]
    cfg = TrainConfig(out_dir=str(tmp_path), max_steps=5, batch_size=2, grad_accum=1, dtype="fp32", progress=False,
                      lr=1e-2, pad_id=0, mode=FULL_THEN_LORA, full_fraction=0.5, save_final=False)
    Trainer(tiny(), cfg, data, lora_config=SETTINGS).fit()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["full"] * 2 + ["lora"] * 3
    last = tmp_path / "checkpoints" / "step-5"
    assert (last / "model.safetensors").is_file() and (last / "adapter" / "adapter_config.json").is_file()


def test_only_the_phase_module_names_the_two_phase_mode():
    """In train/, the string "full-then-lora" (code, messages, docstrings) appears only in
    train/phases.py and in train/config.py's MODES: every other module asks the FineTuningPlan."""
    root = Path(__file__).resolve().parents[2] / "train"
    assert FULL_THEN_LORA in MODES
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).as_posix()
        if rel == "train/phases.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        allowed = set()
        if rel == "train/config.py":
            modes = [n for n in tree.body if isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "MODES"
                                                                               for t in n.targets)]
            assert len(modes) == 1
            allowed = {id(c) for c in ast.walk(modes[0])}
        found += [f"{rel}:{node.lineno}" for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str) and FULL_THEN_LORA in node.value
                  and id(node) not in allowed]
    assert found == []
