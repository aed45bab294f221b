"""Routed-expert adapters in PEFT's fused layout, for the MoE families PEFT does not convert.

This library adapts each routed expert's projections one by one (`mlp.experts.{e}.gate_proj`,
...). transformers 5 holds a layer's experts fused (`mlp.experts.gate_up_proj` [E, 2I, H],
`mlp.experts.down_proj` [E, H, I]), and PEFT (0.21) converts a per-expert adapter onto them only
for the model types whose checkpoint conversion is qwen2_moe's (Qwen3-MoE: yes). Qwen3.5-MoE's
(`qwen3_5_moe_text`) is qwen3_5_text's plus qwen2_moe's, which PEFT does not recognise: it would
load a per-expert adapter's shared-expert and attention parts and silently drop every routed
expert. So for these model types `save` writes the routed experts the way PEFT itself trains
fused experts (`target_parameters`, one `lora.ParamWrapper` per fused tensor), and `load` reads
that layout back:

    down_proj     lora_A [E*r, I]   expert-major rows        lora_B [H, r*E]   expert-minor columns
    gate_up_proj  lora_A [E*2r, H]  per expert [A_gate; A_up]
                  lora_B [2I, 2r*E] per expert the block-diagonal [[B_gate, 0], [0, B_up]]

gate_up_proj has rank 2r and alpha 2·alpha (rsLoRA: √2·alpha) through rank_pattern / alpha_pattern,
so its scale is that of the other modules and its update per expert is exactly gate's and up's
(PEFT does the same when it converts Qwen3-MoE adapters). PEFT nests the two wrappers in the
sorted order of target_parameters: down_proj's tensors sit at `mlp.experts.lora_*`, gate_up_proj's
at `mlp.experts.base_layer.lora_*` (when only one is adapted, it sits at `mlp.experts.lora_*`).

A fused adapter PEFT trained itself (rank r on gate_up_proj, no patterns) loads too: gate and up
then share the expert's A (gate's B is the first I rows, up's the last I). DoRA, or experts
adapted only in part, cannot be written this way: `save` then keeps the per-expert layout and
warns that PEFT will not load the routed experts.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.qwen.families import model_family

from .config import AdapterError
from .layer import LoRALinear, is_linear
from .state import PEFT_PREFIX

# The families whose adapters PEFT does not convert per expert, or converts losing the shared
# expert, say so: Family.peft_fused_experts (models/qwen/families).
# The families PEFT converts as qwen2_moe (transformers' conversion for Qwen3-Next; their
# Family.peft_parameter_targets): PEFT then maps
# *every* gate_proj / up_proj / down_proj entry of target_modules onto the fused experts, so the
# shared expert's and a dense (mlp_only_layers) MLP's adapters would be dropped. For them those
# projections are written as target_parameters naming their 2-D weight (`shared_expert.gate_proj.weight`):
# PEFT wraps the nn.Linear's weight (lora.ParamWrapper), with the same lora_A / lora_B keys and the
# same function W + scale * B A.
DOWN, GATE_UP = "mlp.experts.down_proj", "mlp.experts.gate_up_proj"  # PEFT's target_parameters
GATE_UP_PATTERN = r".*\.gate_up_proj"  # the rank_pattern / alpha_pattern key PEFT itself writes
_EXPERT = re.compile(r"^(?P<experts>.+\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)$")
# a shared expert's or dense MLP's projection: group "suffix" is what a target_parameters entry names
_MLP_LINEAR = re.compile(r"^.+\.(?P<suffix>mlp\.(?:shared_expert\.)?(?:gate|up|down)_proj)$")


def writes_fused_layout(model: nn.Module) -> bool:
    """Whether `model`'s routed-expert adapters go to disk in PEFT's fused layout (the model types
    PEFT does not convert per-expert adapters for)."""
    family = model_family(model)
    return family is not None and family.peft_fused_experts


def writes_parameter_targets(model: nn.Module) -> bool:
    """Whether `model`'s shared-expert / dense-MLP adapters go to disk as target_parameters."""
    family = model_family(model)
    return family is not None and family.peft_parameter_targets


def reads_fused_layout(model: nn.Module) -> bool:
    """Whether `load` takes adapters in PEFT's fused layout (target_parameters): any MoE model."""
    return getattr(getattr(model, "config", None), "num_experts", 0) > 0


def _experts_shape(model: nn.Module) -> tuple[int, int, int]:
    cfg = model.config
    return cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size


# ---------------------------------------------------------------------- save
def fuse(model: nn.Module, tensors: dict[str, torch.Tensor], peft_config: dict[str, Any],
         adapted: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Per-expert adapter tensors -> PEFT's fused layout (new dict and config; inputs untouched).

    adapted: the adapted module paths. Returns the inputs unchanged, with a warning, when the
    routed experts cannot be written fused (DoRA; not every expert of every layer adapted).
    """
    experts: dict[str, dict[str, set[int]]] = {}  # layer's experts path -> projection -> experts
    for name in adapted:
        m = _EXPERT.match(name)
        if m:
            experts.setdefault(m["experts"], {}).setdefault(m["proj"], set()).add(int(m["e"]))
    if not experts:
        return tensors, _mlp_as_parameters(model, peft_config, adapted)
    E, H, I = _experts_shape(model)
    layers = [n for n, mod in model.named_modules() if n.endswith(".mlp.experts") and isinstance(mod, nn.ModuleList)]
    projs = set().union(*experts.values())
    why = None
    if peft_config.get("use_dora"):
        why = "PEFT's fused-expert LoRA has no DoRA"
    elif sorted(experts) != sorted(layers) or any(
            set(p) != projs or any(len(s) != E for s in p.values()) for p in experts.values()):
        why = "not every expert of every layer is adapted for each projection"
    elif ("gate_proj" in projs) != ("up_proj" in projs):
        why = "transformers fuses gate_proj and up_proj into one tensor: adapt both or neither"
    if why:
        warnings.warn(f"routed-expert adapters written per expert, which PEFT does not load for "
                      f"{model.config.model_type} (it drops them): {why}", stacklevel=3)
        return tensors, peft_config

    out = {k: v for k, v in tensors.items() if not _EXPERT.match(_module_of(k))}
    r = int(peft_config["r"])
    kinds = sorted(([DOWN] if "down_proj" in projs else []) + ([GATE_UP] if "gate_proj" in projs else []))
    for layer in layers:
        def part(e: int, proj: str, which: str) -> torch.Tensor:
            return tensors[f"{PEFT_PREFIX}{layer}.{e}.{proj}.lora_{which}.weight"]

        for depth, kind in enumerate(kinds):
            if kind == DOWN:
                A = torch.cat([part(e, "down_proj", "A") for e in range(E)])  # [E*r, I]
                B = torch.stack([part(e, "down_proj", "B") for e in range(E)], dim=-1).reshape(H, r * E)
            else:
                A = torch.cat([torch.cat([part(e, "gate_proj", "A"), part(e, "up_proj", "A")]) for e in range(E)])
                B = part(0, "gate_proj", "B").new_zeros(2 * I, 2 * r, E)
                for e in range(E):
                    B[:I, :r, e] = part(e, "gate_proj", "B")
                    B[I:, r:, e] = part(e, "up_proj", "B")
                B = B.reshape(2 * I, 2 * r * E)
            stem = f"{PEFT_PREFIX}{layer}." + "base_layer." * depth
            out[stem + "lora_A.weight"], out[stem + "lora_B.weight"] = A.contiguous(), B.contiguous()

    config = dict(peft_config)
    targets = config["target_modules"]
    if isinstance(targets, list):  # full paths of single experts name no module of transformers' model
        config["target_modules"] = [t for t in targets if not _EXPERT.match(t)]
    config["target_parameters"] = kinds
    if GATE_UP in kinds:
        alpha = float(config["lora_alpha"]) * (math.sqrt(2) if config.get("use_rslora") else 2)
        config["rank_pattern"] = {GATE_UP_PATTERN: 2 * r}
        config["alpha_pattern"] = {GATE_UP_PATTERN: int(alpha) if alpha.is_integer() else alpha}
    return out, _mlp_as_parameters(model, config, adapted)


def _mlp_as_parameters(model: nn.Module, peft_config: dict[str, Any], adapted: list[str]) -> dict[str, Any]:
    """For the families with Family.peft_parameter_targets: the adapted shared-expert / dense-MLP projections move from
    target_modules to target_parameters (`<suffix>.weight`, or the full path where the suffix would
    select more than was adapted). Returns the new config (the input untouched)."""
    mlp = [n for n in adapted if _MLP_LINEAR.match(n)]
    if not writes_parameter_targets(model) or not mlp:
        return peft_config
    if peft_config.get("use_dora"):
        warnings.warn(f"the shared-expert / dense MLP adapters are written as target_modules, which PEFT drops for "
                      f"{model.config.model_type} (its weight-targeted LoRA has no DoRA)", stacklevel=4)
        return peft_config
    linears = [n for n, m in model.named_modules() if _MLP_LINEAR.match(n) and not _EXPERT.match(n)]
    entries = []
    for suffix in sorted({_MLP_LINEAR.match(n)["suffix"] for n in mlp}):
        chosen = sorted(n for n in mlp if n.endswith("." + suffix))
        if chosen == sorted(n for n in linears if n.endswith("." + suffix)):
            entries.append(f"{suffix}.weight")
        else:
            entries += [f"{n}.weight" for n in chosen]
    config = dict(peft_config, lora_dropout=0.0)  # PEFT's ParamWrapper refuses dropout (see peft_io)
    targets = config["target_modules"]
    if isinstance(targets, list):
        leaves = ("gate_proj", "up_proj", "down_proj")
        config["target_modules"] = [t for t in targets if t not in leaves and not _MLP_LINEAR.match(t)]
    config["target_parameters"] = [*config.get("target_parameters", []), *entries]
    return config


def _module_of(key: str) -> str:
    return key[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0] if key.startswith(PEFT_PREFIX) else key


# ---------------------------------------------------------------------- load
def split(model: nn.Module, tensors: dict[str, torch.Tensor], cfg: dict[str, Any],
          file: Path) -> dict[str, torch.Tensor]:
    """PEFT's fused routed-expert tensors -> per-expert ones (every other key passes unchanged).

    cfg: read_peft_config's fields, with target_parameters, rank_pattern and alpha_pattern.
    Errors name the file and the key or field that does not fit.
    """
    config_file = file.parent / "adapter_config.json"
    # a 2-D linear weight named by target_parameters (see Family.peft_parameter_targets): its tensors
    # are per module already
    kinds = sorted(_kind(t, config_file) for t in cfg["target_parameters"] if not _names_linear_weight(model, t))
    if len(set(kinds)) != len(kinds):
        raise AdapterError(f"{config_file}: target_parameters {cfg['target_parameters']!r} names a tensor twice")
    if cfg["use_dora"]:
        raise AdapterError(f"{config_file}: use_dora with target_parameters (PEFT's fused experts have no DoRA)")
    r, alpha, scale = cfg["r"], cfg["lora_alpha"], _scale(cfg["lora_alpha"], cfg["r"], cfg["use_rslora"])
    ranks = {DOWN: r, GATE_UP: r}
    for field, values in (("rank_pattern", cfg["rank_pattern"]), ("alpha_pattern", cfg["alpha_pattern"])):
        if set(values) - {GATE_UP_PATTERN} or (values and GATE_UP not in kinds):
            raise AdapterError(f"{config_file}: {field} {values!r} is not supported (expected {{}} or only "
                               f"{GATE_UP_PATTERN!r}, for gate_up_proj)")
    if GATE_UP in kinds:
        ranks[GATE_UP] = int(cfg["rank_pattern"].get(GATE_UP_PATTERN, r))
        gate_up_alpha = float(cfg["alpha_pattern"].get(GATE_UP_PATTERN, alpha))
        if ranks[GATE_UP] not in (r, 2 * r) or not math.isclose(
                _scale(gate_up_alpha, ranks[GATE_UP], cfg["use_rslora"]), scale, rel_tol=1e-6):
            raise AdapterError(
                f"{config_file}: gate_up_proj has rank {ranks[GATE_UP]} and alpha {gate_up_alpha:g}: expected rank "
                f"{r} or {2 * r} with the scale of the other modules ({scale:g}) — one LoRA rank for every module"
            )

    E, H, I = _experts_shape(model)
    layers = [n for n, mod in model.named_modules() if n.endswith(".mlp.experts") and isinstance(mod, nn.ModuleList)]
    out = dict(tensors)
    for layer in layers:
        for depth, kind in enumerate(kinds):
            stem = f"{PEFT_PREFIX}{layer}." + "base_layer." * depth
            rk = ranks[kind]
            want = {"A": (E * rk, I if kind == DOWN else H), "B": (H if kind == DOWN else 2 * I, rk * E)}
            got = {}
            for which, shape in want.items():
                key = f"{stem}lora_{which}.weight"
                if key not in out:
                    raise AdapterError(f"{file}: missing {key!r} ({kind} of target_parameters)")
                got[which] = out.pop(key)
                if tuple(got[which].shape) != shape:
                    raise AdapterError(f"{file}: key {key!r} has shape {tuple(got[which].shape)}, expected {shape} "
                                       f"({E} experts, rank {rk}): an adapter for a different model?")
            A = got["A"].reshape(E, rk, -1)
            B = got["B"].reshape(got["B"].shape[0], rk, E)
            for e in range(E):
                pieces = {"down_proj": (A[e], B[:, :, e])} if kind == DOWN else _split_gate_up(
                    A[e], B[:, :, e], I, r, f"{file}: {stem}lora_B.weight")
                for proj, (a, b) in pieces.items():
                    out[f"{PEFT_PREFIX}{layer}.{e}.{proj}.lora_A.weight"] = a.contiguous()
                    out[f"{PEFT_PREFIX}{layer}.{e}.{proj}.lora_B.weight"] = b.contiguous()
    left = [k for k in out if ".mlp.experts.lora_" in k or ".mlp.experts.base_layer." in k]
    if left:
        raise AdapterError(f"{file}: key {left[0]!r} matches none of target_parameters {kinds}")
    return out


def _split_gate_up(A: torch.Tensor, B: torch.Tensor, I: int, r: int, where: str) -> dict:
    """One expert's fused gate_up LoRA (A [rk, H], B [2I, rk]) -> gate's and up's (rank r each)."""
    if A.shape[0] == r:  # PEFT's own fused LoRA: one A for both halves
        return {"gate_proj": (A, B[:I]), "up_proj": (A, B[I:])}
    if B[:I, r:].any() or B[I:, :r].any():
        raise AdapterError(f"{where}: gate_up_proj's rank-{2 * r} B is not block-diagonal over gate / up, so it "
                           f"is no pair of rank-{r} adapters (train it with rank {r} on gate_up_proj)")
    return {"gate_proj": (A[:r], B[:I, :r]), "up_proj": (A[r:], B[I:, r:])}


def _names_linear_weight(model: nn.Module, target: Any) -> bool:
    """Whether a target_parameters entry is `<module suffix>.weight` of a linear layer of `model`."""
    if not isinstance(target, str) or not target.endswith(".weight"):
        return False
    module = target[: -len(".weight")]
    return any((n == module or n.endswith("." + module)) and (is_linear(m) or isinstance(m, LoRALinear))
               for n, m in model.named_modules())


def _kind(target: Any, config_file: Path) -> str:
    """A target_parameters entry (PEFT matches it as a suffix of the parameter path) -> DOWN / GATE_UP."""
    for kind in (DOWN, GATE_UP):
        if isinstance(target, str) and (kind == target or kind.endswith("." + target)):
            return kind
    router = isinstance(target, str) and target.split(".")[-2:] == ["gate", "weight"]
    hint = (": a LoRA on the MoE router, which this library never adapts (PEFT's 'all-linear' on transformers 5 "
            "adds it; name the projections instead)") if router else ""
    raise AdapterError(f"{config_file}: target_parameters entry {target!r} is not supported (expected "
                       f"{DOWN!r}, {GATE_UP!r} or the weight of a linear layer){hint}")


def _scale(alpha: float, r: int, rslora: bool) -> float:
    return alpha / (math.sqrt(r) if rslora else r)
