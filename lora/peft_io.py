"""PEFT on-disk format: `save(model, dir)` and `load(model, dir)`.

    dir/adapter_config.json        peft_type LORA, r, lora_alpha, target_modules, ... (config.py)
    dir/adapter_model.safetensors  base_model.model.<module>.lora_A.weight   [r, in]
                                   base_model.model.<module>.lora_B.weight   [out, r]
                                   base_model.model.<module>.lora_magnitude_vector [out]  (DoRA)
                                   base_model.model.<module>.weight          (modules_to_save)

`load` takes adapters written by us or by PEFT itself and injects as needed. Every key must
land on a module of the right shape, and every adapter in the model must get its tensors:
anything else is an error naming the key (or file).

Qwen3-MoE adapters are written per expert (`...mlp.experts.{e}.gate_proj.lora_A.weight`), the
layout of the published checkpoints, which vLLM reads and which PEFT converts itself when it
loads onto transformers 5's fused experts (`target_parameters`, rank doubled for the fused
gate_up_proj, same function). Two consequences of that conversion: PEFT refuses a non-zero
lora_dropout on fused experts, so the file says 0 (dropout is a training setting: the adapter's
function is the same); and PEFT maps *every* gate_proj / up_proj / down_proj target onto the
experts, so LoRA on the dense MLP of a layer in `mlp_only_layers` does not survive a PEFT load
(save warns; this library loads it). Qwen3.5-MoE's routed experts, which PEFT does not convert,
go to disk in PEFT's own fused layout instead (lora/fused_experts.py); so do Qwen3-Next's, whose
shared-expert and dense-MLP projections are written as target_parameters, which PEFT keeps.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from fileio.atomic import atomic_directory
from fileio.errors import CheckpointError
from fileio.safetensors_file import load_tensors, write_tensors
from models.qwen import whole
from models.qwen.families import model_family

from . import fused_experts
from .config import CONFIG_NAME, PICKLE_WEIGHTS_NAME, WEIGHTS_NAME, AdapterError, LoRAConfig, read_peft_config
from .inject import (
    _freeze_base,
    _resolve_modules_to_save,
    _wrap_modules_to_save,
    adapter_modules,
    config_of,
    has_adapters,
    inject_modules,
    trainable_copies,
)
from .layer import LoRALinear, is_linear
from .state import PEFT_PREFIX, adapter_state_dict
from .targets import EXPERT_PROJECTION, MLP_PROJECTION, peft_target_modules
from .v1_adapter import V1_MODULES_TO_SAVE, is_v1_adapter, map_v1_adapter

LORA_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_magnitude_vector": "m"}


# ---------------------------------------------------------------------- save
def save(model: nn.Module, path: Union[str, os.PathLike], base_model_name_or_path: Optional[str] = None,
         tokenizer=None) -> Path:
    """Write the adapter of `model` to `path` in PEFT format; returns the directory.

    base_model_name_or_path defaults to where the model was loaded from (`model.name_or_path`).
    tokenizer: also write its files (so the adapter directory is self-contained). The directory
    is written whole and renamed into place (fileio.atomic), so a crash never leaves half
    an adapter under `path`.
    """
    config: Optional[LoRAConfig] = config_of(model)
    if config is None:
        raise ValueError(f"{type(model).__name__} holds no LoRA adapter: call lora.inject(model) or lora.load first")
    tensors = {k: v.to("cpu").contiguous() for k, v in adapter_state_dict(model).items()}
    # Tied copies share storage; safetensors refuses shared tensors, so give each its own.
    seen: set[int] = set()
    for k, v in tensors.items():
        if v.untyped_storage().data_ptr() in seen:
            tensors[k] = v.clone()
        seen.add(tensors[k].untyped_storage().data_ptr())
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model, "name_or_path", None)
        base_model_name_or_path = str(base_model_name_or_path) if base_model_name_or_path else None
    peft_config = config.to_peft(base_model_name_or_path)
    # A model says what PEFT task it is (a sequence classifier: SEQ_CLS, which PEFT loads over
    # AutoModelForSequenceClassification); a causal LM says nothing.
    peft_config["task_type"] = getattr(model, "peft_task_type", peft_config["task_type"])
    adapted = list(adapter_modules(model))
    if any(EXPERT_PROJECTION.search(n) for n in adapted):
        peft_config["lora_dropout"] = 0.0  # see the module docstring
        dense = [n for n in adapted if MLP_PROJECTION.search(n)]
        if dense and not fused_experts.writes_parameter_targets(model):
            warnings.warn(
                f"the adapter holds LoRA on dense MLP layers of a mixture-of-experts model (e.g. {dense[0]!r}): "
                "PEFT on transformers 5 maps every gate_proj/up_proj/down_proj target onto the fused experts and "
                "drops these; this library loads the adapter as it is", stacklevel=2,
            )
    family = model_family(model)
    if config.use_rslora and family is not None and family.peft_doubles_expert_alpha and any(
            EXPERT_PROJECTION.search(n) for n in adapted):
        warnings.warn(
            "PEFT (0.21) loads Qwen3-MoE expert adapters trained with rsLoRA at the wrong scale: converting them "
            "onto transformers' fused experts it sets gate_up_proj's alpha to 2*alpha (rsLoRA needs sqrt(2)*alpha), "
            "also when the file is written fused; this library reads the per-expert adapter as trained",
            stacklevel=2,
        )
    if fused_experts.writes_fused_layout(model):
        tensors, peft_config = fused_experts.fuse(model, tensors, peft_config, adapted)
    tensors = {_checkpoint_key(model, k): v for k, v in tensors.items()}
    _rename_modules(peft_config, lambda name: whole.checkpoint_name(model, name))
    root = Path(path)
    with atomic_directory(root, fsync=False) as tmp:
        write_tensors(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        text = json.dumps(peft_config, indent=2, sort_keys=True) + "\n"
        (tmp / CONFIG_NAME).write_text(text, encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return root


def _checkpoint_key(model: nn.Module, key: str) -> str:
    """An adapter key under the module names of the checkpoint the model came from: for a Qwen3.5
    vision-language one, base_model.model.model.language_model.layers.0... (models/qwen/whole.py),
    the paths of transformers' ...ForConditionalGeneration that PEFT adapts, and the names vLLM's
    LoRA loader maps onto its language model (hf_to_vllm_mapper: model.language_model. ->
    language_model.model.)."""
    return PEFT_PREFIX + whole.checkpoint_name(model, key[len(PEFT_PREFIX):]) if key.startswith(PEFT_PREFIX) else key


def _our_key(key: str) -> str:
    """The inverse of _checkpoint_key: an adapter for a vision-language checkpoint's text model
    (ours, or PEFT's on ...ForConditionalGeneration) loads onto our text model."""
    return PEFT_PREFIX + whole.our_name(key[len(PEFT_PREFIX):]) if key.startswith(PEFT_PREFIX) else key


def _rename_modules(cfg: dict, rename) -> None:
    """Apply `rename` to the module paths in target_modules / modules_to_save (names such as
    "q_proj", suffixes of every path, stay as they are; a regex string is left alone)."""
    for field in ("target_modules", "modules_to_save"):
        if isinstance(cfg.get(field), list):
            cfg[field] = [rename(n) if isinstance(n, str) else n for n in cfg[field]]


# ---------------------------------------------------------------------- load
def read_adapter_tensors(path: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """All tensors of dir/adapter_model.safetensors (pickle .bin adapters are refused)."""
    root = Path(path)
    file = root / WEIGHTS_NAME
    if not file.is_file():
        if (root / PICKLE_WEIGHTS_NAME).is_file():
            raise AdapterError(
                f"{root / PICKLE_WEIGHTS_NAME}: pickle adapters are not loaded (unsafe); "
                f"re-save it as {WEIGHTS_NAME} (PEFT: save_pretrained(..., safe_serialization=True))"
            )
        raise AdapterError(f"{file}: not found (a PEFT adapter directory holds {WEIGHTS_NAME})")
    try:
        return load_tensors(file)
    except CheckpointError as e:  # a header the format forbids, a truncated file (names the file)
        raise AdapterError(str(e)) from None


def load(
    model: nn.Module,
    path: Union[str, os.PathLike],
    dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """Load a PEFT-format LoRA adapter from directory `path` into `model`; returns `model`.

    A model without adapters gets them injected into exactly the modules the file names (with
    the file's r, alpha, dropout, rsLoRA, DoRA, modules_to_save). A model that already has
    adapters must have the same settings and modules; its adapter weights are replaced.
    dtype: adapter parameter dtype when injecting (default float32).
    """
    root = Path(path)
    if not root.is_dir():
        raise AdapterError(f"{root}: adapter directory not found")
    cfg = read_peft_config(root / CONFIG_NAME, fused_experts=fused_experts.reads_fused_layout(model))
    _rename_modules(cfg, whole.our_name)
    tensors = {_our_key(k): v for k, v in read_adapter_tensors(root).items()}
    file = root / WEIGHTS_NAME
    _check_values(tensors, file)
    if cfg["target_parameters"]:  # routed experts in PEFT's fused layout -> per expert
        tensors = fused_experts.split(model, tensors, cfg, file)
    v1 = is_v1_adapter(tensors, model)
    if not v1:   # (a Qwen-7B v1 adapter names v1 modules, mapped below)
        _check_target_modules(model, cfg["target_modules"], root / CONFIG_NAME)
    if v1:  # trained on Qwen-7B v1 (c_attn, w1, w2, c_proj): map onto our Qwen2 names
        tensors = map_v1_adapter(tensors, model, file)
        if cfg["modules_to_save"]:
            cfg["modules_to_save"] = [V1_MODULES_TO_SAVE.get(n, n) for n in cfg["modules_to_save"]]
    lora_keys, copy_keys = _split_keys(model, tensors, cfg, file)

    modules = [m for m in _module_order(model) if m in lora_keys]
    lora_keys = {m: lora_keys[m] for m in modules}  # model order: errors name the first layer
    if not modules and not copy_keys:
        raise AdapterError(f"{file}: holds no LoRA tensors")
    for name, parts in lora_keys.items():
        want = {"A", "B"} | ({"m"} if cfg["use_dora"] else set())
        if set(parts) != want:
            missing = sorted(want - set(parts))
            extra = sorted(set(parts) - want)
            what = (
                f"missing {[_key(name, p) for p in missing]}" if missing
                else f"unexpected {[_key(name, p) for p in extra]} (use_dora is {cfg['use_dora']})"
            )
            raise AdapterError(f"{file}: module {name!r}: {what}")

    if not has_adapters(model):
        config = LoRAConfig(
            r=cfg["r"],
            lora_alpha=cfg["lora_alpha"],
            lora_dropout=cfg["lora_dropout"],
            use_rslora=cfg["use_rslora"],
            use_dora=cfg["use_dora"],
            target_modules=(
                peft_target_modules(model, modules, None) if v1 or cfg["target_modules"] is None
                else cfg["target_modules"]
            ),
            modules_to_save=cfg["modules_to_save"],
        )
        _check_shapes(model, lora_keys, copy_keys, tensors, cfg["r"], file)
        if modules:
            inject_modules(model, modules, config, dtype=dtype)
        else:
            _freeze_base(model)
        _wrap_copies(model, copy_keys, tensors)
    else:
        _check_matches_model(model, cfg, lora_keys, copy_keys, file)
        _check_shapes(model, lora_keys, copy_keys, tensors, cfg["r"], file)

    _copy_values(model, lora_keys, copy_keys, tensors)
    return model


def _check_values(tensors: dict[str, torch.Tensor], file: Path) -> None:
    """Adapter weights are floating point and finite: an int lora_B would be cast (erasing it),
    a NaN would spread through every merged weight it touches."""
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise AdapterError(f"{file}: tensor {key!r} is {str(t.dtype).replace('torch.', '')}, expected a "
                               "floating-point weight")
        if not torch.isfinite(t).all():
            raise AdapterError(f"{file}: tensor {key!r} holds {int((~torch.isfinite(t)).sum())} NaN or Inf value(s)")


def _check_target_modules(model: nn.Module, targets, file: Path) -> None:
    """target_modules must name modules of this model, as PEFT requires: a name (a suffix of
    module paths) or a regex over the full paths that matches nothing is an error."""
    import re

    if targets is None or targets == "all-linear":
        return
    names = [n for n, _ in model.named_modules() if n]
    if isinstance(targets, str):
        try:
            if not any(re.fullmatch(targets, n) for n in names):
                raise AdapterError(f"{file}: target_modules {targets!r} matches no module of {type(model).__name__}")
        except re.error as e:
            raise AdapterError(f"{file}: target_modules {targets!r} is not a valid regex ({e})") from None
        return
    for t in targets:
        if not isinstance(t, str) or not t or "/" in t or ".." in t:
            raise AdapterError(f"{file}: target_modules entry {t!r} is not a module name")
        if not any(n == t or n.endswith("." + t) for n in names):
            raise AdapterError(f"{file}: target_modules entry {t!r} names no module of {type(model).__name__} "
                               "(an adapter for a different model?)")


def _key(module: str, part: str) -> str:
    suffix = {v: k for k, v in LORA_SUFFIXES.items()}[part]
    return PEFT_PREFIX + module + suffix


def _module_order(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules()]


def _split_keys(model, tensors, cfg, file):
    """Sort file keys into LoRA parts {module: {"A"|"B"|"m": key}} and modules_to_save
    {module: {param: key}}; a key that fits neither is an error naming it."""
    modules = dict(model.named_modules())
    lora: dict[str, dict[str, str]] = {}
    copies: dict[str, dict[str, str]] = {}
    save_suffixes = cfg["modules_to_save"] or []
    for key in tensors:
        if not key.startswith(PEFT_PREFIX):
            raise AdapterError(f"{file}: key {key!r} does not start with {PEFT_PREFIX!r} (not a PEFT LoRA adapter)")
        rest = key[len(PEFT_PREFIX):]
        for suffix, part in LORA_SUFFIXES.items():
            if rest.endswith(suffix):
                name = rest[: -len(suffix)]
                if name not in modules:
                    raise AdapterError(
                        f"{file}: key {key!r} matches no module of {type(model).__name__} "
                        f"(no module named {name!r}: an adapter for a different model?)"
                    )
                lora.setdefault(name, {})[part] = key
                break
        else:
            name, _, param = rest.rpartition(".")
            if name in modules and any(name == s or name.endswith("." + s) for s in save_suffixes):
                copies.setdefault(name, {})[param] = key
            else:
                hint = "" if save_suffixes else " (modules_to_save is empty in adapter_config.json)"
                raise AdapterError(f"{file}: key {key!r} matches no LoRA module of {type(model).__name__}{hint}")
    return lora, copies


def _check_shapes(model, lora_keys, copy_keys, tensors, r, file) -> None:
    for name, parts in lora_keys.items():
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            in_f, out_f = module.in_features, module.out_features
        elif is_linear(module):
            in_f, out_f = module.in_features, module.out_features
        else:
            raise AdapterError(f"{file}: key {parts['A']!r}: module {name!r} is a {type(module).__name__}, not a linear")
        expected = {"A": (r, in_f), "B": (out_f, r), "m": (out_f,)}
        for part, key in parts.items():
            got = tuple(tensors[key].shape)
            if got != expected[part]:
                raise AdapterError(
                    f"{file}: key {key!r} has shape {got}, expected {expected[part]} "
                    f"(r={r}, module {name!r} is {in_f} -> {out_f}): an adapter for a different model?"
                )
    for name, params in copy_keys.items():
        module = model.get_submodule(name)
        target = module.modules_to_save if hasattr(module, "modules_to_save") else module
        own = dict(target.named_parameters())
        for param, key in params.items():
            if param not in own:
                raise AdapterError(f"{file}: key {key!r}: module {name!r} has no parameter {param!r}")
            got, want = tuple(tensors[key].shape), tuple(own[param].shape)
            if got != want:
                raise AdapterError(f"{file}: key {key!r} has shape {got}, expected {want}")
        missing = [p for p in own if p not in params]
        if missing:
            raise AdapterError(f"{file}: modules_to_save {name!r} lacks {[PEFT_PREFIX + name + '.' + p for p in missing]}")


def _wrap_copies(model, copy_keys, tensors) -> None:
    """modules_to_save from a file: tied partners share one copy only if their tensors agree
    (ours always do; PEFT trains two separate copies, which unties the model)."""
    names = [n for n in _module_order(model) if n in copy_keys]
    if not names:
        return
    expanded = _resolve_modules_to_save(model, names)
    partners = [n for n in expanded if n not in names]
    tied_groups = _tied_groups(model, names)
    share = all(
        all(torch.equal(tensors[copy_keys[g[0]]["weight"]], tensors[copy_keys[o]["weight"]]) for o in g[1:])
        for g in tied_groups
    )
    if partners or not share:
        warnings.warn(
            f"the adapter trains {names} separately from their tied partner(s) "
            f"{partners or [g[1:] for g in tied_groups]}: with the adapter active the model is untied"
        )
    _wrap_modules_to_save(model, names, share_tied=share)


def _tied_groups(model, names) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for n in names:
        w = model.get_submodule(n)._parameters.get("weight")
        if w is not None:
            groups.setdefault(id(w), []).append(n)
    return [g for g in groups.values() if len(g) > 1]


def _check_matches_model(model, cfg, lora_keys, copy_keys, file) -> None:
    have: Optional[LoRAConfig] = config_of(model)
    layers = adapter_modules(model)
    if have is not None:
        for field, ours in (("r", have.r), ("lora_alpha", have.lora_alpha), ("use_rslora", have.use_rslora),
                            ("use_dora", have.use_dora)):
            if cfg[field] != ours:
                raise AdapterError(
                    f"{file.parent / CONFIG_NAME}: {field}={cfg[field]!r} but the model's adapter has {field}={ours!r}; "
                    "load into a model without adapters (or merge first)"
                )
    missing = [n for n in layers if n not in lora_keys]
    if missing:
        raise AdapterError(f"{file}: no tensors for the model's adapter {missing[0]!r} (expected {_key(missing[0], 'A')!r})")
    extra = [n for n in lora_keys if n not in layers]
    if extra:
        raise AdapterError(f"{file}: key {_key(extra[0], 'A')!r} is for {extra[0]!r}, which holds no adapter in this model")
    copies = trainable_copies(model)
    if set(copies) != set(copy_keys):
        raise AdapterError(
            f"{file}: modules_to_save in the file {sorted(copy_keys)} differ from the model's {sorted(copies)}"
        )


@torch.no_grad()
def _copy_values(model, lora_keys, copy_keys, tensors) -> None:
    for name, parts in lora_keys.items():
        layer: LoRALinear = model.get_submodule(name)
        layer.lora_A.weight.copy_(tensors[parts["A"]])
        layer.lora_B.weight.copy_(tensors[parts["B"]])
        if "m" in parts:
            layer.lora_magnitude_vector.copy_(tensors[parts["m"]])
    for name, params in copy_keys.items():
        target = model.get_submodule(name).modules_to_save
        own = dict(target.named_parameters())
        for param, key in params.items():
            own[param].copy_(tensors[key])
