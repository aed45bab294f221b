"""Which linears an adapter goes into: "all-linear", module-name suffixes, or a regex.

Semantics follow PEFT: "all-linear" is every linear but the output head; a list matches a
module whose name equals an entry or ends with "." + entry; a regex must match the whole
module name. Qwen-7B v1 names are aliases, because our loader maps v1 checkpoints onto the
Qwen2 names: c_attn -> q/k/v_proj, w1 -> up_proj, w2 -> gate_proj, mlp.c_proj -> down_proj,
attn.c_proj -> o_proj (bare c_proj -> both); the v1 family declares them
(models/qwen/families/v1.py MODULE_ALIASES).

Qwen3-MoE: each expert's projections are linears of their own (`mlp.experts.{e}.gate_proj`,
as the published checkpoints name them), so "all-linear" and the suffixes gate_proj / up_proj /
down_proj adapt every expert. The router (`mlp.gate`) is not a linear layer and never a target,
as in transformers, where it is not an nn.Linear either.

Qwen3.5-MoE: "all-linear" also adapts the shared expert (`mlp.shared_expert.{gate,up,down}_proj`)
but not `mlp.shared_expert_gate`, the one-row linear whose sigmoid scales it (a rank-r adapter on a
[1, hidden] weight is no low-rank update: it has more parameters than the weight); the family
declares which linears "all-linear" leaves out (Family.frozen_linears, models/qwen/families). PEFT's
"all-linear" does adapt it: name it (targets=[..., "shared_expert_gate"]) to do the same, and an
adapter that holds it loads.

Qwen3-Next: the same, plus its Gated DeltaNet's fused in_proj_qkvz / in_proj_ba and out_proj, and
the dense MLP of layers in mlp_only_layers.
"""

from __future__ import annotations

import re
from typing import Union

from torch import nn

from models.qwen.families import keeps_16bit
from models.qwen.families.v1 import MODULE_ALIASES as V1_ALIASES  # (lora.V1_ALIASES: public)
from models.qwen.moe import TopKRouter

from .layer import LoRALinear, is_linear

ALL_LINEAR = "all-linear"
OUTPUT_HEADS = ("lm_head", "score")   # the LM head; a sequence classifier's head (PEFT: modules_to_save)

_REGEX_CHARS = set("^$*+?{}[]\\|()")

# A projection of one Qwen3-MoE expert, and a dense MLP projection (a layer without experts).
EXPERT_PROJECTION = re.compile(r"(?:^|\.)mlp\.experts\.\d+\.(?:gate|up|down)_proj$")
MLP_PROJECTION = re.compile(r"(?:^|\.)mlp\.(?:gate|up|down)_proj$")


def linear_names(model: nn.Module) -> list[str]:
    """Names of every linear LoRA could wrap (already-wrapped ones included), model order."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            names.append(name)
        elif is_linear(module) and not _inside_wrapper(model, name):
            names.append(name)
    return names


def _inside_wrapper(model: nn.Module, name: str) -> bool:
    """True for a module inside a LoRALinear/TrainableCopy (base_layer, lora_A, copies...)."""
    from .trainable_copy import TrainableCopy

    parts = name.split(".")
    for i in range(1, len(parts)):
        parent = model.get_submodule(".".join(parts[:i]))
        if isinstance(parent, (LoRALinear, TrainableCopy)):
            return True
    return False


def is_output_head(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf in OUTPUT_HEADS


def _suffix_match(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def resolve_targets(model: nn.Module, targets: Union[str, list[str], tuple[str, ...]]) -> list[str]:
    """Module paths of the linears `targets` selects, in model order. Zero matches is an error
    that lists the available linear names."""
    available = linear_names(model)
    if isinstance(targets, str) and targets == ALL_LINEAR:
        chosen = [n for n in available if not is_output_head(n) and not keeps_16bit(model, n)]
        what = "'all-linear'"
    elif isinstance(targets, str) and (set(targets) & _REGEX_CHARS):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise ValueError(f"targets={targets!r} is not a valid regular expression ({e})") from None
        chosen = [n for n in available if pattern.fullmatch(n)]
        what = f"regex {targets!r}"
    else:
        suffixes = [targets] if isinstance(targets, str) else list(targets)
        if not suffixes or not all(isinstance(s, str) and s for s in suffixes):
            raise ValueError(f"targets must be 'all-linear', a regex or a list of module-name suffixes, got {targets!r}")
        chosen_set: set[str] = set()
        unmatched = []
        for s in suffixes:
            hits = {n for n in available if _suffix_match(n, s)}
            if not hits and s in V1_ALIASES:  # a Qwen-7B v1 name on a model with Qwen2 names
                hits = {n for n in available for alias in V1_ALIASES[s] if _suffix_match(n, alias)}
            if not hits:
                unmatched.append(s)
            chosen_set |= hits
        if unmatched:
            routers = [n for n, m in model.named_modules() if isinstance(m, TopKRouter)]
            hint = ""
            if any(_suffix_match(r, s) for r in routers for s in unmatched):
                hint = " (the MoE router mlp.gate is not a linear layer: it is never a LoRA target)"
            raise ValueError(
                f"LoRA targets {unmatched} match no linear layer of {type(model).__name__}{hint}; "
                f"available linear names: {_summarise(available)}"
            )
        chosen = [n for n in available if n in chosen_set]
        what = f"targets {suffixes}"
    if not chosen:
        raise ValueError(
            f"LoRA {what} matches no linear layer of {type(model).__name__}; "
            f"available linear names: {_summarise(available)}"
        )
    return chosen


def _summarise(names: list[str]) -> str:
    """Distinct leaf names plus a few full paths: readable even for a 28-layer model."""
    if not names:
        return "(the model has no nn.Linear / NF4Linear modules)"
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    examples = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return f"{leaves} (e.g. {examples})"


def peft_target_modules(model: nn.Module, chosen: list[str], targets) -> list[str]:
    """What to write as target_modules so that PEFT selects exactly `chosen`.

    PEFT matches its regex against every module of *its* model, which may hold modules ours
    lacks (transformers' `mlp.act_fn`), so a regex is never written back: the leaf names
    (["down_proj", "q_proj", ...]) when they select exactly `chosen` here, else full paths.
    """
    names = [n for n, _ in model.named_modules() if n and not _inside_wrapper(model, n)]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in chosen})
    selected = [n for n in names if any(_suffix_match(n, leaf) for leaf in leaves)]
    if sorted(selected) == sorted(chosen):
        return leaves
    return sorted(chosen)
