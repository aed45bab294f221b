"""HF checkpoint I/O: `load(dir)` streams safetensors tensor by tensor into our decoder and
`save(model, dir)` writes a directory that transformers' AutoModelForCausalLM loads as is (for a
model read from a Qwen3.5 vision-language checkpoint, that whole checkpoint again, which
AutoModelForImageTextToText loads: models/qwen/whole.py).

A loader must consume every tensor and initialise none silently: any missing, unexpected or
mis-shaped tensor is an error naming the tensor and the file. Pickle checkpoints
(pytorch_model.bin) are refused: we never unpickle files from disk.

Quantisation is a parameter, not a lookup: `load(dir, quantize=quant.NF4Quantizer())` hands
each decoder linear to the quantizer object as it is read (`Quantizer` below says what that
object does). `models.qwen` imports no package of the project above it.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import re
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence, Union

import torch
from torch import nn

from fileio.atomic import OWNER_FILES, atomic_directory
from fileio.folder import PROCESSOR_FILES, TOKENIZER_FILES, VOCABULARY_FILES, copy_folder_files
from fileio.safe_load import loads_json, read_json
from fileio.safetensors_file import entry_nbytes, read_header, read_tensors, write_streamed, write_tensors

from . import whole
from .config import QwenConfig, dtype_from_name, dtype_name, merge_eos
from .errors import CheckpointError, ConfigError
from .model import Qwen
from .module_tree import replace_module
from .score import QwenForSequenceClassification, is_sequence_classifier

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"


# ---------------------------------------------------------------------- quantizers
class Quantizer(Protocol):
    """What `load(..., quantize=...)` needs (quant.NF4Quantizer is one).

    quantize_linear: a decoder linear's weight [out, in] (and bias [out] or None) as read from
        disk -> the module that replaces the nn.Linear, on `device`, computing in `compute_dtype`.
    serialized_suffixes / load_serialized: for checkpoints saved already quantised (config.json
        `quantization_config`): the extra tensors of a module (`weight.absmax`, ...) and how to
        build the module from them; required_suffixes: those of them every module must have.
    """

    serialized_suffixes: Sequence[str]
    required_suffixes: Sequence[str]

    def quantize_linear(self, name: str, weight: torch.Tensor, bias: Optional[torch.Tensor], *,
                        device: torch.device, compute_dtype: torch.dtype) -> nn.Module: ...

    def load_serialized(self, name: str, tensors: dict, bias: Optional[torch.Tensor], *,
                        device: torch.device, compute_dtype: torch.dtype) -> nn.Module: ...


# ---------------------------------------------------------------------- file discovery
def checkpoint_files(path: Union[str, os.PathLike]) -> list[Path]:
    """The safetensors files of a checkpoint directory, in index order."""
    root = Path(path)
    index = root / SAFE_INDEX
    if index.exists():
        try:
            weight_map = loads_json(index.read_bytes())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
        files = sorted(set(weight_map.values()))
        inside = root.resolve()
        for f in files:
            if Path(f).is_absolute() or not (root / f).resolve().is_relative_to(inside):
                raise CheckpointError(f"{index}: shard {f!r} lies outside the model folder {root}; refused")
        missing = [f for f in files if not (root / f).exists()]
        if missing:
            raise CheckpointError(f"{index}: lists shard {missing[0]} which does not exist in {root}")
        return [root / f for f in files]
    if (root / SAFE_SINGLE).exists():
        return [root / SAFE_SINGLE]
    shards = sorted(root.glob("*.safetensors"))
    if shards:
        return shards
    if list(root.glob("*.bin")) or list(root.glob("*.pt")) or list(root.glob("*.pth")):
        raise CheckpointError(
            f"{root}: only pickle weights (*.bin/*.pt) found; they are not loaded for safety. "
            f"Convert them to safetensors first (e.g. save_pretrained(..., safe_serialization=True))"
        )
    raise CheckpointError(f"{root}: no model.safetensors, {SAFE_INDEX} or *.safetensors found")


_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")   # model.layers.N. / transformer.h.N. (v1)
_EXPERT_INDEX = re.compile(r"\.experts\.(\d+)\.")
_FUSED_EXPERT_NAMES = ("experts.gate_up_proj", "experts.down_proj")   # transformers' [experts, ...] tensors


def held_counts(files: list[Path]) -> tuple[int, int]:
    """(decoder layers, experts per layer) the safetensors files hold, read from their headers
    alone: layers 0..n-1 each have a tensor; experts likewise, or a fused tensor's first dim."""
    layers, experts, fused = set(), set(), 0
    for file in files:
        with open(file, "rb") as fh:
            header, _ = read_header(file, fh)
        for key, info in header.items():
            if m := _LAYER_INDEX.search(key):
                layers.add(int(m.group(1)))
            if m := _EXPERT_INDEX.search(key):
                experts.add(int(m.group(1)))
            elif key.endswith(_FUSED_EXPERT_NAMES) and info["shape"]:
                fused = max(fused, info["shape"][0])
    return _run_from_zero(layers), max(_run_from_zero(experts), fused)


def _run_from_zero(indices: set) -> int:
    n = 0
    while n in indices:
        n += 1
    return n


def check_counts(root: Path, cfg: QwenConfig, files: list[Path]) -> None:
    """config.json may not claim more layers or experts than the weights hold: checked on the
    headers before the model is built (building 10**9 layers would never finish)."""
    layers, experts = held_counts(files)
    where = f"the safetensors files in {root}"
    if cfg.num_hidden_layers > layers:
        raise ConfigError(f"{root / 'config.json'}: num_hidden_layers = {cfg.num_hidden_layers}, but {where} "
                          f"hold {layers} decoder layers")
    if cfg.num_experts > experts:
        raise ConfigError(f"{root / 'config.json'}: num_experts = {cfg.num_experts}, but {where} hold "
                          f"{experts} experts per layer")


def checked_config(path: Union[str, os.PathLike]) -> QwenConfig:
    """The QwenConfig of a checkpoint directory, its layer and expert counts checked against the
    weights (what the model may be built from: `load`, or a meta-device model for its shape)."""
    root = Path(path)
    cfg = QwenConfig.from_hf(root / "config.json")
    check_counts(root, cfg, checkpoint_files(root))
    return cfg


def iter_tensors(files: list[Path], skip: Optional[Callable[[str], bool]] = None
                 ) -> Iterator[tuple[str, Optional[torch.Tensor], Path]]:
    """Yield (key, tensor, file) one tensor at a time (fileio.safetensors_file.read_tensors;
    tensor None, unread, for a key `skip` accepts)."""
    for file in files:
        for key, tensor in read_tensors(file, skip):
            yield key, tensor, file


# ---------------------------------------------------------------------- load
def _is_ignored(key: str) -> bool:
    # Old exports carry the RoPE table as a buffer; it is recomputed, never read, never written.
    return key.endswith("rotary_emb.inv_freq")


def _read_json(path: Path) -> Optional[dict]:
    if not path.exists():
        return None
    return read_json(path, CheckpointError)


def _set_param(model: nn.Module, key: str, value: torch.Tensor, requires_grad: bool = True) -> None:
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[attr] = nn.Parameter(value, requires_grad=requires_grad and value.is_floating_point())


def quantizable_linears(model: Qwen) -> dict[str, nn.Linear]:
    """The decoder-block linears that a 4-bit load quantises (never embeddings, the head or, like
    the router, what the family keeps 16-bit: Family.frozen_linears, e.g. shared_expert_gate)."""
    family = model.config.family
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.layers.")
            and not family.keeps_16bit(n)}


def load(
    path: Union[str, os.PathLike],
    dtype: Optional[Union[torch.dtype, str]] = None,
    device: Union[str, torch.device] = "cpu",
    quantize: Optional[Quantizer] = None,
) -> Qwen:
    """Load an HF-format Qwen checkpoint directory into `Qwen`, tensor by tensor.

    dtype: parameter dtype (default: the config's torch_dtype). quantize: None, or a `Quantizer`
    such as quant.NF4Quantizer() that quantises every decoder linear as it is read (peak memory
    ~ the 4-bit model + one tensor; Qwen3-MoE: every expert projection, never the router).
    Checkpoints already saved in bitsandbytes 4-bit format (config.json `quantization_config`)
    need the quantizer that reads them: quantize=quant.NF4Quantizer(). Qwen3-MoE experts load from
    per-expert tensors (the published layout, what `save` writes) or from transformers' fused
    `mlp.experts.gate_up_proj` / `down_proj`.
    """
    if isinstance(quantize, str):
        raise TypeError(f"quantize={quantize!r}: pass the quantizer itself, e.g. quantize=quant.NF4Quantizer() "
                        "(models.qwen imports no quantization package by name)")
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory (expected an HF-format Qwen checkpoint)")
    raw_config = _read_json(root / "config.json")
    if raw_config is None:
        raise ConfigError(f"{root / 'config.json'}: not found (a Qwen checkpoint directory holds config.json)")
    cfg = QwenConfig.from_hf(root / "config.json")
    dtype = dtype_from_name(dtype) or dtype_from_name(cfg.torch_dtype)
    device = torch.device(device)
    files = checkpoint_files(root)

    qconf = raw_config.get("quantization_config")
    serialized = None
    if qconf:
        if qconf.get("quant_method") != "bitsandbytes" or not qconf.get("load_in_4bit"):
            raise CheckpointError(
                f"{root / 'config.json'}: quantization_config {qconf.get('quant_method')!r} is not supported "
                f"(only bitsandbytes 4-bit nf4)"
            )
        if quantize is None:
            raise CheckpointError(
                f"{root / 'config.json'}: the weights are saved in bitsandbytes 4-bit (quantization_config): "
                "load them with quantize=quant.NF4Quantizer()"
            )
        serialized = quantize
    quantizer = quantize

    cfg.extra.pop("quantization_config", None)
    check_counts(root, cfg, files)
    # A ...ForSequenceClassification folder (a reward model): the decoder and its `score` head.
    model_class = QwenForSequenceClassification if is_sequence_classifier(raw_config) else Qwen
    with torch.device("meta"):
        model = model_class(cfg)
    linears = quantizable_linears(model) if quantizer else {}
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    tied = cfg.tie_word_embeddings and model_class is Qwen
    if tied:
        expected.pop("lm_head.weight", None)
    pending: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)  # module -> suffix -> tensor
    filled: set[str] = set()
    suffixes = tuple(getattr(serialized, "serialized_suffixes", ())) if serialized else ()

    def module_complete(name: str) -> bool:
        got = pending[name]
        need = {"weight"} | ({"bias"} if linears[name].bias is not None else set()) | set(suffixes)
        return need <= set(got)

    skipped: dict[str, Path] = {}  # tensors outside the model we build (Qwen3.5's vision tower) -> their shard
    family = cfg.family
    nested = family.nested(cfg)
    for key, tensor, file in iter_tensors(files, skip=family.skip_unread(cfg)):
        pairs = family.checkpoint_pairs(key, tensor, cfg, file)  # the family's names -> ours
        if pairs is None:
            skipped[key] = file
            continue
        for name, value in pairs:
            if _is_ignored(name):
                continue
            if tied and name == "lm_head.weight":
                continue  # tied: the head is the embedding; a stored copy is redundant
            module_name, _, suffix = name.partition(".weight")
            owner = None
            for cand in (name.rsplit(".", 1)[0], module_name):
                if cand in linears:
                    owner = cand
                    break
            if owner is not None:
                suffix = name[len(owner) + 1 :]
                if suffix not in ("weight", "bias") + suffixes:
                    raise CheckpointError(f"{file}: unexpected tensor {name!r}")
                if suffix == "weight" and not serialized:
                    _check_shape(name, value, expected[name], file)
                    _check_values(name, value, file)
                if suffix == "bias":
                    _check_shape(name, value, expected[name], file)
                    _check_values(name, value, file)
                if suffix in pending[owner]:
                    raise CheckpointError(f"{file}: tensor {name!r} appears twice")
                pending[owner][suffix] = value
                if module_complete(owner):
                    _build_quantized(model, owner, pending.pop(owner), quantizer, serialized, device, dtype)
                    filled.update(k for k in expected if k.startswith(owner + "."))
                    del linears[owner]
                continue
            if name not in expected:
                raise CheckpointError(f"{file}: unexpected tensor {name!r} (not a parameter of {cfg.model_type})")
            if name in filled:
                raise CheckpointError(f"{file}: tensor {name!r} appears twice")
            _check_shape(name, value, expected[name], file)
            _check_values(name, value, file)
            _set_param(model, name, value.to(device=device, dtype=dtype))
            filled.add(name)

    required = tuple(serialized.required_suffixes) if serialized else ()
    for name in [n for n, got in pending.items() if serialized and {"weight", *required} <= set(got)]:
        # e.g. a 4-bit checkpoint without double quantisation has no nested_* statistics
        if linears[name].bias is not None and "bias" not in pending[name]:
            continue
        _build_quantized(model, name, pending.pop(name), quantizer, serialized, device, dtype)
        filled.update(k for k in expected if k.startswith(name + "."))
        del linears[name]
    if pending:
        name, got = next(iter(pending.items()))
        raise CheckpointError(f"{root}: incomplete tensors for {name}: found only {sorted(got)}")
    missing = [k for k in expected if k not in filled]
    if missing:
        raise CheckpointError(
            f"{root}: missing tensor {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    if tied:
        model.tie_weights()
    model.model.rotary_emb.inv_freq = model.model.rotary_emb._inv_freq(device)
    gen = _read_json(root / "generation_config.json")
    model.generation_config = gen or {}
    model.name_or_path = str(root)
    # (before the dtype below: a checkpoint cast on load and saved so gets its new dtype written)
    whole.record(model, root, raw_config, nested=nested, skipped=skipped)
    cfg.torch_dtype = dtype_name(dtype)
    model.eval()
    return model


def _check_shape(name: str, value: torch.Tensor, expected: torch.Tensor, file: Path) -> None:
    if tuple(value.shape) != tuple(expected.shape):
        raise CheckpointError(
            f"{file}: tensor {name!r} has shape {tuple(value.shape)}, expected {tuple(expected.shape)}"
        )


_FINITE_CHECK_ELEMENTS = 1 << 22  # 4M elements: 4 MB of bool temporaries per slice


def _check_values(name: str, value: torch.Tensor, file: Path) -> None:
    """A weight is floating point and finite: an int tensor would be cast silently, an Inf or NaN
    would surface steps later as a NaN loss or a crash in sampling."""
    if not value.is_floating_point():
        raise CheckpointError(f"{file}: tensor {name!r} is {str(value.dtype).replace('torch.', '')}, expected a "
                              "floating-point weight")
    # A NaN or Inf makes the sum non-finite: one pass, no temporaries (isfinite of a whole
    # embedding is 3-50x slower and makes temporaries of twice its size, which would raise the
    # loader's peak memory). Only a non-finite sum (or one that overflowed) is looked at closely.
    if torch.isfinite(value.sum()):
        return
    flat = value.reshape(-1)
    bad = sum(int((~torch.isfinite(flat[i : i + _FINITE_CHECK_ELEMENTS])).sum())
              for i in range(0, flat.numel(), _FINITE_CHECK_ELEMENTS))
    if bad:
        raise CheckpointError(f"{file}: tensor {name!r} holds {bad} NaN or Inf value(s)")


def _build_quantized(model, name, tensors, quantizer, serialized, device, dtype) -> None:
    bias = tensors.pop("bias", None)
    if bias is not None:
        bias = bias.to(device=device, dtype=dtype)
    if serialized is not None:
        module = serialized.load_serialized(name, tensors, bias, device=device, compute_dtype=dtype)
    else:
        module = quantizer.quantize_linear(name, tensors["weight"], bias, device=device, compute_dtype=dtype)
    replace_module(model, name, module)
    tensors.clear()
    release_freed_host_memory()


@functools.lru_cache(maxsize=None)
def _malloc_trim() -> Optional[Callable[[int], int]]:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return None


def release_freed_host_memory() -> None:
    """Hand the memory of freed tensors back to the OS (glibc's malloc_trim).

    Why: glibc raises its mmap threshold after large blocks are freed, so the 16-bit weights
    and fp32 temporaries of one quantised tensor after another land on the heap, which then
    keeps them resident. Measured on a Qwen2.5-1.5B-shaped checkpoint loaded with
    NF4 (quant.NF4Quantizer): peak RSS 85% of the bf16 size without trimming, <60% with it
    (benchmarks/RESULTS-nf4.md).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


# ---------------------------------------------------------------------- save
def parse_size(size: Union[int, str]) -> int:
    """'5GB' / '500MB' / 1000 -> bytes (decimal units, as transformers' max_shard_size)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size {size!r}: expected e.g. '5GB', '500MB' or a byte count")
    units = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    return int(float(m.group(1)) * units[(m.group(2) or "").upper()])


def checkpoint_names(model: nn.Module) -> set[str]:
    """The tensor names of `model`'s checkpoint layout: the state-dict keys of a fresh model of its
    config (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        layout = QwenForSequenceClassification if isinstance(model, QwenForSequenceClassification) else Qwen
        return set(layout(model.config).state_dict())


def foreign_name(names: Iterator[str], known: set[str]) -> Optional[str]:
    """The first of `names` that the layout `known` does not hold (a quantised weight's statistics,
    `<weight>.absmax` and the like, belong to their weight; a recomputed rotary buffer to none)."""
    for name in names:
        if _is_ignored(name) or name in known:
            continue
        if ".weight." in name and name.split(".weight.", 1)[0] + ".weight" in known:
            continue
        return name
    return None


def export_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Checkpoint tensors of `model`: exactly the names of its checkpoint layout (any other
    tensor, an adapter's say, is refused by name), tied head dropped, contiguous CPU copies."""
    state = model.state_dict()
    bad = foreign_name(iter(state), checkpoint_names(model))
    if bad is not None:
        raise ValueError(
            f"{bad} is not a parameter of a {model.config.model_type} checkpoint: merge adapters first "
            "(lora.merge(model)) before save(), or save them with lora.save(model, dir)"
        )
    tied = getattr(model, "is_tied", False)
    if tied:
        state.pop("lm_head.weight", None)
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items() if not _is_ignored(k)}


def _shards(state: dict, max_bytes: int) -> list[dict]:
    shards: list[dict] = [{}]
    size = 0
    for k, v in state.items():
        nbytes = entry_nbytes(v)
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    return shards


def save(
    model: Qwen,
    path: Union[str, os.PathLike],
    max_shard_size: Union[int, str] = "5GB",
    tokenizer: Any = None,
    dtype: Optional[Union[torch.dtype, str]] = None,
    state_dict: Optional[dict[str, torch.Tensor]] = None,
    keep: Sequence[str] = OWNER_FILES,
) -> Path:
    """Write an HF-format checkpoint directory, atomically (temp dir + rename).

    Files: config.json, generation_config.json, model.safetensors or sharded
    model-0000i-of-0000n.safetensors + model.safetensors.index.json, and the tokenizer files:
    those of `tokenizer` (anything with `save_pretrained(dir)`), else copies of the ones in the
    directory the model was loaded from; a model with neither is written with a warning, since
    transformers would then build a useless tokenizer for it. Processor files of that directory
    (fileio.folder.PROCESSOR_FILES) are always copied. dtype: cast floating tensors.
    state_dict: the tensors to write (default: the model's own; e.g. a LoRA model's base,
    `lora.base_state_dict(model)`). keep: entries of an existing `path` carried over
    (fileio.atomic.OWNER_FILES: the lock and run.json of the script writing it).

    A model loaded from a Qwen3.5 vision-language checkpoint is written whole, as that checkpoint
    was (models/qwen/whole.py): its architecture and config, the text tensors under its names,
    and its vision tower and MTP head copied byte for byte from its shards.
    """
    root = Path(path)
    cfg: QwenConfig = model.config
    state = export_state_dict(model) if state_dict is None else _checked_state(state_dict, model)
    dtype = dtype_from_name(dtype)
    if dtype is not None:
        # Cast weights only: 4-bit statistics (`*.weight.absmax`, ...) keep their own dtypes.
        state = {k: (v.to(dtype) if v.is_floating_point() and ".weight." not in k else v) for k, v in state.items()}
    float_dtypes = [v.dtype for k, v in state.items() if v.is_floating_point() and "norm" not in k]
    saved_dtype = dtype or (float_dtypes[0] if float_dtypes else torch.bfloat16)
    source = whole.source_of(model)
    if source is not None:
        state = {source.checkpoint_name(k): v for k, v in state.items()}
        state.update(source.skipped_slices())

    with atomic_directory(root, fsync=False, keep=keep) as tmp:
        _write_shards(state, tmp, parse_size(max_shard_size), streamed=source is not None)
        hf = cfg.to_hf()
        hf["torch_dtype"] = hf["dtype"] = dtype_name(saved_dtype)
        hf["tie_word_embeddings"] = bool(getattr(model, "is_tied", cfg.tie_word_embeddings))
        if source is not None:
            hf = source.hf_config(hf)
        if isinstance(model, QwenForSequenceClassification):
            hf = model.hf_config(hf)
        qconfs = [m.hf_quantization_config for m in model.modules() if getattr(m, "hf_quantization_config", None)]
        if qconfs:
            hf["quantization_config"] = qconfs[0]
        _write_json(tmp / "config.json", hf)
        _write_json(tmp / "generation_config.json", generation_config(model))
        folder = source.root if source is not None else getattr(model, "name_or_path", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        else:
            copy_folder_files(folder, tmp, TOKENIZER_FILES)
        copy_folder_files(folder, tmp, PROCESSOR_FILES)
        if not any((tmp / n).is_file() for n in VOCABULARY_FILES):
            warnings.warn(f"{root}: written without tokenizer files (none given, none next to the weights it was "
                          "loaded from): transformers would build a 1-token tokenizer for it; pass tokenizer=",
                          stacklevel=2)
    return root


def _write_shards(state: dict, tmp: Path, max_bytes: int, streamed: bool) -> None:
    """model.safetensors, or shards + index. streamed: `state` also holds FileSlices (tensors
    copied from another checkpoint), written one at a time (safetensors_file.write_streamed)."""
    write = write_streamed if streamed else write_tensors
    shards = _shards(state, max_bytes)
    if len(shards) == 1:
        write(shards[0], tmp / SAFE_SINGLE, metadata={"format": "pt"})
        return
    weight_map = {}
    n = len(shards)
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        write(shard, tmp / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    index = {"metadata": {"total_size": sum(entry_nbytes(v) for v in state.values())}, "weight_map": weight_map}
    (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _checked_state(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    bad = foreign_name(iter(state), checkpoint_names(model))
    if bad is not None:
        raise ValueError(f"state_dict holds {bad!r}, not a tensor of a {model.config.model_type} checkpoint: "
                         "pass the base model's tensors (lora.base_state_dict(model))")
    tied = getattr(model, "is_tied", False)
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()
            if not _is_ignored(k) and not (tied and k == "lm_head.weight")}


def generation_config(model: Qwen) -> dict:
    """generation_config.json: the loaded one (if any) with bos/pad from the config and eos the
    config's followed by the other ids the loaded one listed (a base's `[151645, 151643]` stays
    a list, so HF's generate still stops at <|endoftext|>)."""
    cfg = model.config
    gen = dict(getattr(model, "generation_config", None) or {})
    gen.pop("transformers_version", None)
    eos = merge_eos(cfg.eos_token_id, gen.get("eos_token_id"))
    gen.update(bos_token_id=cfg.bos_token_id, eos_token_id=eos)
    if cfg.pad_token_id is not None:
        gen["pad_token_id"] = cfg.pad_token_id
    return gen


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
