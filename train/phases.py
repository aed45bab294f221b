"""What trains when: the plan of a run's phases, from TrainConfig.mode.

    plan = FineTuningPlan.of(cfg.mode, cfg.full_fraction, lora_config, total_steps)
    plan.phase_at(0)                 # "full" | "lora": the phase of the update after `step` steps
    plan.switch_step                 # full-then-lora: round(full_fraction * total_steps); else None
    plan.switch_due(step, phase)     # True once: the loop, before the update after `step` steps
    plan.enter(model, phase)         # the phase's trainable set (inject lora_config at the switch)

Modes (train.config.MODES) and their phases, for a run of T optimizer steps:
    lora            "lora" for every step: the adapters the caller injected train
    full            "full" for every step: every floating-point parameter trains
    full-then-lora  "full" for the first S = round(full_fraction * T) steps, then `lora_config`
                    is injected into the updated model and the adapters train ("lora") for the
                    other T - S steps, with a fresh optimizer over the new trainable set

What the phase decides elsewhere:
    checkpoint      trainable.safetensors holds what trains; after the switch the base no longer
                    trains but has moved, so model.safetensors holds it too (`saves_base`)
    resume          the checkpoint's state.json "phase" (one of PHASES) is entered before the
                    weights are copied in, so a resume in the LoRA phase re-injects the adapters
    final export    out/model whenever the base trained (`trains_base`), out/adapter whenever
                    the model holds adapters (train.export)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

import lora
from quant import NF4Linear

FULL, LORA = "full", "lora"
PHASES = (FULL, LORA)
FULL_THEN_LORA = "full-then-lora"   # the two-phase mode (one of train.config.MODES)


def is_two_phase(mode: str) -> bool:
    """Whether `mode` injects adapters part-way through the run (full, then LoRA)."""
    return mode == FULL_THEN_LORA


def trains_base(mode: str) -> bool:
    """Whether the base model's own weights change in some phase of `mode` (then out/model is written)."""
    return mode in (FULL, FULL_THEN_LORA)


def full_fraction_problem(mode: str, full_fraction: float) -> Optional[str]:
    """What TrainConfig.full_fraction should be for `mode`, or None when it fits."""
    if is_two_phase(mode) and not 0.0 < full_fraction < 1.0:
        return f"a fraction in (0, 1) of the steps to train in full with mode={FULL_THEN_LORA!r}"
    return None


@dataclass(frozen=True)
class FineTuningPlan:
    """The phases of one run (module docstring). switch_step: the number of steps after which the
    LoRA phase begins (None with a single phase); lora_config: the adapters injected then."""

    mode: str
    total_steps: int
    switch_step: Optional[int] = None
    lora_config: Optional["lora.LoRAConfig"] = None

    @classmethod
    def of(cls, mode: str, full_fraction: float, lora_config: Optional["lora.LoRAConfig"], total_steps: int
           ) -> "FineTuningPlan":
        if not is_two_phase(mode):
            return cls(mode, total_steps)
        if lora_config is None:
            raise ValueError(f"mode={FULL_THEN_LORA!r} needs lora_config=lora.LoRAConfig(...): the adapters injected "
                             "when the full phase ends")
        return cls(mode, total_steps, round(full_fraction * total_steps), lora_config)

    @property
    def trains_base(self) -> bool:
        return trains_base(self.mode)

    def phase_at(self, step: int) -> str:
        """The phase of the update that follows `step` completed steps (0 <= step < total_steps)."""
        if self.switch_step is None:
            return FULL if self.mode == FULL else LORA
        return FULL if step < self.switch_step else LORA

    def switch_due(self, step: int, phase: str) -> bool:
        """True when the run, in `phase` after `step` steps, must enter the LoRA phase now."""
        return self.switch_step is not None and phase == FULL and step >= self.switch_step

    def saves_base(self, phase: str) -> bool:
        """Whether a checkpoint in `phase` also stores the frozen base (it moved in the full phase)."""
        return self.switch_step is not None and phase == LORA

    def enter(self, model: nn.Module, phase: str) -> None:
        """Make `phase`'s parameters of `model` trainable: every floating-point one ("full"), or the
        adapters ("lora": injected from lora_config in the two-phase mode, the caller's otherwise)."""
        if phase == FULL:
            if lora.has_adapters(model):
                raise ValueError(f"mode={self.mode!r} (its full phase) but the model already holds LoRA adapters: "
                                 "merge them first (lora.merge) or use mode='lora'")
            if any(isinstance(m, NF4Linear) for m in model.modules()):
                raise ValueError("full-parameter training of an NF4-quantised model is not possible: the 4-bit weights "
                                 "have no gradient. Use mode='lora' (QLoRA) or load the model unquantised")
            for p in model.parameters():
                p.requires_grad_(p.is_floating_point())
        elif self.lora_config is not None and not lora.has_adapters(model):
            lora.inject(model, **self.lora_config.inject_kwargs())
        elif not any(p.requires_grad for p in model.parameters()):
            raise ValueError("mode='lora' but nothing in the model is trainable: inject adapters first "
                             "(lora.inject(model, r=16, ...)) or use mode='full'")
