"""`inject`: put LoRA adapters into a model in place (and find them again: adapter_modules,
config_of). Around it: state.py (state dicts), toggle.py (adapters on/off), summary.py
(parameter counts, the gradient check), merge.py (folding them back in)."""

from __future__ import annotations

import weakref
from typing import Optional, Sequence, Union

import torch
from torch import nn

from models.qwen.module_tree import replace_module

from . import grouped_experts
from .config import LoRAConfig
from .layer import LoRALinear, is_nf4_linear
from .targets import ALL_LINEAR, peft_target_modules, resolve_targets
from .trainable_copy import TrainableCopy



# ---------------------------------------------------------------------- queries
def adapter_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Module path -> LoRALinear, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def trainable_copies(model: nn.Module) -> dict[str, TrainableCopy]:
    """Module path -> TrainableCopy (modules_to_save), in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, TrainableCopy)}


def has_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, (LoRALinear, TrainableCopy)) for m in model.modules())


def _weight_owners(model: nn.Module) -> dict[int, list[str]]:
    """id(weight Parameter) -> names of the modules that hold it (tied weights: several)."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        w = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if isinstance(w, nn.Parameter):
            owners.setdefault(id(w), [])
            if name not in owners[id(w)]:
                owners[id(w)].append(name)
    return owners


# ---------------------------------------------------------------------- inject
def inject(
    model: nn.Module,
    r: int = 16,
    alpha: float = 16,
    dropout: float = 0.0,
    targets: Union[str, Sequence[str]] = ALL_LINEAR,
    rslora: bool = False,
    dora: bool = False,
    modules_to_save: Optional[Sequence[str]] = None,
    dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """Replace the targeted linears by `LoRALinear` in place and freeze every base parameter.

    targets: "all-linear" (every linear but the output head), module-name suffixes
    (["q_proj", "v_proj"]; Qwen-7B v1 names c_attn/w1/w2/c_proj are aliases) or a regex over
    the full module name. modules_to_save: suffixes of modules (embed_tokens, lm_head) that
    get a fully trainable copy; with tied embeddings both get one shared copy.
    dtype: adapter parameter dtype (default float32). Returns `model`.
    """
    if has_adapters(model):
        cfg = config_of(model)
        got = f" (r={cfg.r}, alpha={cfg.lora_alpha:g}, dora={cfg.use_dora}, targets={cfg.target_modules})" if cfg else ""
        raise ValueError(
            f"the model already holds LoRA adapters{got}: injecting again would stack two adapters. "
            "Call lora.merge(model) first to train a new adapter on the merged weights, or lora.load(model, dir) "
            "to replace the adapter weights"
        )
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"r (LoRA rank) must be a positive int, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    chosen = resolve_targets(model, targets)
    save_names = _resolve_modules_to_save(model, modules_to_save) if modules_to_save else []
    _check_targets(model, chosen, save_names)

    _freeze_base(model)
    for name in chosen:
        base = model.get_submodule(name)
        replace_module(model, name, LoRALinear(base, r, alpha, dropout, rslora, dora, dtype))
    _wrap_modules_to_save(model, save_names, share_tied=True)
    grouped_experts.install(model)
    return model


def config_of(model: nn.Module) -> Optional[LoRAConfig]:
    """The settings of the model's adapters, read from its layers (None without adapters): what
    `save` writes as adapter_config.json. target_modules selects exactly the adapted modules."""
    layers = adapter_modules(model)
    copies = trainable_copies(model)
    if not layers and not copies:
        return None
    first = next(iter(layers.values()), None)
    dropout = getattr(first, "lora_dropout", None)
    return LoRAConfig(
        r=first.r if first is not None else 8,   # modules_to_save alone: PEFT needs some r
        lora_alpha=first.alpha if first is not None else 8.0,
        lora_dropout=float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0,
        use_rslora=bool(first.rslora) if first is not None else False,
        use_dora=bool(first.use_dora) if first is not None else False,
        target_modules=peft_target_modules(model, list(layers), None) if layers else [],
        modules_to_save=sorted({n.rsplit(".", 1)[-1] for n in copies}) or None,
        modules=list(layers),
    )


def inject_modules(model: nn.Module, modules: Sequence[str], config: LoRAConfig, dtype=None) -> nn.Module:
    """Inject into exactly the named module paths (used by `load`); errors name the path."""
    for name in modules:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"no module {name!r} in {type(model).__name__}") from None
        if not (isinstance(module, nn.Linear) or is_nf4_linear(module)):
            raise ValueError(f"module {name!r} is a {type(module).__name__}, not a linear layer LoRA can wrap")
    _check_targets(model, list(modules), [])
    _freeze_base(model)
    for name in modules:
        base = model.get_submodule(name)
        layer = LoRALinear(
            base, config.r, config.lora_alpha, config.lora_dropout, config.use_rslora, config.use_dora, dtype
        )
        replace_module(model, name, layer)
    grouped_experts.install(model)
    return model


# model -> its parameters' requires_grad flags before the first injection, restored by `merge`
# (kept here, not as an attribute on the model).
_saved_flags: "weakref.WeakKeyDictionary[nn.Module, dict[str, bool]]" = weakref.WeakKeyDictionary()


def _freeze_base(model: nn.Module) -> None:
    """Freeze every parameter, remembering the flags so `merge` can restore them."""
    if model not in _saved_flags:
        _saved_flags[model] = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)


def restore_flags(model: nn.Module) -> None:
    """The requires_grad flags from before the first injection (after `merge`)."""
    saved = _saved_flags.pop(model, {})
    for n, p in model.named_parameters():
        p.requires_grad_(saved.get(n, False))


def _check_targets(model: nn.Module, chosen: list[str], save_names: list[str]) -> None:
    owners = _weight_owners(model)
    for name in chosen:
        if name in save_names:
            raise ValueError(f"{name!r} is both a LoRA target and in modules_to_save; choose one")
        w = model.get_submodule(name)._parameters.get("weight")
        shared = [o for o in owners.get(id(w), []) if o != name] if w is not None else []
        if shared:
            raise ValueError(
                f"LoRA target {name!r} shares its weight with {shared[0]!r} (tied embeddings): merging would "
                "change both; put it in modules_to_save instead or untie the weights"
            )


def _resolve_modules_to_save(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Full paths for modules_to_save suffixes, plus the tied partner of each (stays tied)."""
    if isinstance(names, str):
        names = [names]
    all_names = [n for n, _ in model.named_modules() if n]
    chosen: list[str] = []
    for s in names:
        hits = [n for n in all_names if n == s or n.endswith("." + s)]
        if not hits:
            candidates = [n for n, m in model.named_modules() if isinstance(m, (nn.Embedding, nn.Linear))]
            raise ValueError(
                f"modules_to_save entry {s!r} matches no module; candidates: "
                f"{sorted({c.rsplit('.', 1)[-1] for c in candidates})}"
            )
        chosen += [h for h in hits if h not in chosen]
    owners = _weight_owners(model)
    for name in list(chosen):
        w = model.get_submodule(name)._parameters.get("weight")
        for partner in owners.get(id(w), []) if w is not None else []:
            if partner not in chosen:
                chosen.append(partner)
    return [n for n in all_names if n in chosen]


def _wrap_modules_to_save(model: nn.Module, names: Sequence[str], share_tied: bool) -> None:
    """Wrap each named module in a TrainableCopy; tied originals share one copy if share_tied."""
    copies_by_weight: dict[int, nn.Parameter] = {}
    for name in names:
        original = model.get_submodule(name)
        w = original._parameters.get("weight")
        shared = copies_by_weight.get(id(w)) if (share_tied and w is not None) else None
        wrapper = TrainableCopy(original, shared_weight=shared)
        if w is not None and id(w) not in copies_by_weight:
            copies_by_weight[id(w)] = wrapper.modules_to_save.weight
        replace_module(model, name, wrapper)
