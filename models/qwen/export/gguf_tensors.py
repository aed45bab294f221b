"""Which checkpoint tensors go into a GGUF, under which names and in which GGML types.

The decisions are those of llama.cpp's convert_hf_to_gguf.py for Qwen2/Qwen3/Qwen3-MoE:

* names come from the gguf package's own table (`gguf.get_tensor_name_map`):
  `model.layers.3.self_attn.q_proj.bias` -> `blk.3.attn_q.bias`, `lm_head.weight` -> `output.weight`;
  Qwen's RoPE is NEOX-style rotate-half, which is what llama.cpp runs for these architectures,
  so q/k weights are written as they are (no permutation);
* Qwen3-MoE's experts (`Qwen2MoeModel.modify_tensors`): a layer's per-expert matrices
  `mlp.experts.{e}.{gate,up,down}_proj.weight` are stacked in expert order into one 3-D tensor
  each, [n_expert, rows, cols] -> `blk.N.ffn_gate_exps` / `ffn_up_exps` / `ffn_down_exps`;
  the router `mlp.gate.weight` is `blk.N.ffn_gate_inp`;
* 1-D tensors (norms, biases) and the router stay F32; every other matrix takes the file type
  (F16, BF16 or Q8_0); one whose rows are not a whole number of Q8_0 blocks (32) falls back to F16;
* a tied head (`tie_word_embeddings`) is not written: llama.cpp then uses `token_embd` as
  the output layer, as transformers does;
* the hybrid families (Qwen3.5, Qwen3.5-MoE, Qwen3-Next) go through the converter's own
  transformations first (gguf_hybrid.py), and their conv1d kernels stay F32 too.

Every tensor's GGUF name and shape is planned by running the same conversion (`converted`)
on "meta" tensors of the header's shapes, then again on the data when it is written.

Shapes are numpy's ([rows, cols] = [out, in]); GGUF stores them reversed, as ggml does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import gguf
import numpy as np
import torch

from fileio.safetensors_file import read_header as read_safetensors_header

from ..checkpoint import CheckpointError, check_counts, checkpoint_files
from ..config import ConfigError, QwenConfig
from ..model import Qwen
from ..whole import TEXT_PREFIX, our_name
from .errors import ExportError
from .gguf_hybrid import gguf_name_of, hybrid_items, hybrid_tensors

# `--type` name -> (general.file_type, the GGML type of the matrices)
FILE_TYPES: dict[str, tuple[gguf.LlamaFileType, gguf.GGMLQuantizationType]] = {
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, gguf.GGMLQuantizationType.BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
}
F32 = gguf.GGMLQuantizationType.F32
F16 = gguf.GGMLQuantizationType.F16
# Matrices llama.cpp keeps in F32 whatever the file type (the converter's list in
# ModelBase.prepare_tensors): the MoE router, the shared expert's gate, the Gated DeltaNet's conv1d kernel.
F32_MATRICES = tuple(gguf.TENSOR_NAMES[t].rsplit(".", 1)[-1]   # "ffn_gate_inp", "ffn_gate_inp_shexp", "ssm_conv1d"
                     for t in (gguf.MODEL_TENSOR.FFN_GATE_INP, gguf.MODEL_TENSOR.FFN_GATE_INP_SHEXP,
                               gguf.MODEL_TENSOR.SSM_CONV1D))
EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(down|gate|up)_proj\.weight")


@dataclass(frozen=True)
class TensorPlan:
    """One tensor of the GGUF: where it comes from, its name, shape [rows, cols] and type."""

    hf_name: str
    gguf_name: str
    shape: tuple[int, ...]
    ggml_type: gguf.GGMLQuantizationType
    parts: tuple[str, ...] = ()   # the checkpoint tensors stacked into it (experts, in order)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.ggml_type]
        return self.numel // block * size



def gguf_architecture(config: QwenConfig) -> "gguf.MODEL_ARCH":
    """The gguf package's architecture of the config's family (Family.gguf_architecture, which
    read_config has checked is set)."""
    by_name = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
    return by_name[config.family.gguf_architecture]


def check_file_type(file_type: str) -> None:
    if file_type not in FILE_TYPES:
        raise ExportError(f"GGUF type {file_type!r} is not supported: expected one of {', '.join(FILE_TYPES)}")


def ggml_type_for(gguf_name: str, shape: tuple[int, ...], file_type: str) -> gguf.GGMLQuantizationType:
    """The GGML type llama.cpp's converter gives this tensor under `file_type`."""
    check_file_type(file_type)
    if (len(shape) <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight")
            or gguf_name.split(".")[-2] in F32_MATRICES):
        return F32  # llama.cpp's kernels for norms and other 1-D tensors (and its router) take F32 only
    wanted = FILE_TYPES[file_type][1]
    block, _ = gguf.GGML_QUANT_SIZES[wanted]
    if shape[-1] % block:
        return F16  # the converter's fallback when a row is not a whole number of blocks
    return wanted


def plan_tensors(model_dir: Path, config: QwenConfig, file_type: str) -> list[TensorPlan]:
    """The GGUF's tensors, in checkpoint order, from the safetensors headers (no data is read).

    Every tensor the model needs must be present with its shape, and nothing else.
    """
    check_file_type(file_type)
    if "quantization_config" in config.extra:
        quant = config.extra["quantization_config"]
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        raise ExportError(f"{model_dir / 'config.json'}: the weights are quantised ({method}); export a merged "
                          f"16-bit model (examples/merge.py writes one)")
    try:
        files = checkpoint_files(model_dir)
        check_counts(model_dir, config, files)   # before anything is built per layer
    except (CheckpointError, ConfigError) as e:
        raise ExportError(str(e)) from None
    arch = gguf_architecture(config)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    expected = expected_shapes(config)

    checked: list[tuple[str, torch.Tensor]] = []
    for file in files:
        with open(file, "rb", buffering=0) as fh:
            try:
                header, _ = read_safetensors_header(file, fh)
            except CheckpointError as e:
                raise ExportError(str(e)) from None
        # the order checkpoint.iter_tensors reads them in, as "meta" tensors of their shapes
        metas = ((k, torch.empty([int(d) for d in header[k]["shape"]], device="meta"))
                 for k in sorted(header) if k != "__metadata__")
        for hf_name, meta in checkpoint_items(metas, config, file):
            shape = tuple(meta.shape)
            if hf_name not in expected:
                raise ExportError(f"{file}: tensor {hf_name!r} is not part of a {config.model_type} model "
                                  f"of this config (LoRA weights must be merged first)")
            want = expected.pop(hf_name)
            if shape != want:
                raise ExportError(f"{file}: tensor {hf_name!r} has shape {list(shape)}, config.json implies {list(want)}")
            checked.append((hf_name, meta))
    if expected:
        missing = sorted(expected)
        raise ExportError(f"{model_dir}: tensor {missing[0]!r} is missing ({len(missing)} in all)")
    plans: list[TensorPlan] = []
    try:
        for hf_name, parts, gguf_name, meta in converted(checked, config, names):
            shape = tuple(meta.shape)
            plans.append(TensorPlan(hf_name, gguf_name, shape, ggml_type_for(gguf_name, shape, file_type), parts))
    except ExportError as e:
        raise ExportError(f"{model_dir}: {e}") from None
    return plans


def checkpoint_items(items: Iterable[tuple[str, Any]], config: QwenConfig, file: Path) -> Iterator[tuple[str, Any]]:
    """Checkpoint (name, tensor) in the order read, minus what a GGUF leaves out (`skipped`; the
    hybrids' MTP head), the hybrids' fused experts split per expert."""
    if config.family.nested(config):
        items = text_model_items(items)
    items = ((n, t) for n, t in items if not skipped(n, config))
    if not config.family.hybrid:
        yield from items
        return
    try:
        yield from hybrid_items(items, config, file)
    except CheckpointError as e:   # a fused expert tensor of the wrong shape (names the file)
        raise ExportError(str(e)) from None


def text_model_items(items: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    """A vision-language checkpoint's (Qwen3_5[Moe]ForConditionalGeneration) text model, as the
    converter's text GGUF holds it: `model.language_model.*` as `model.*`, `lm_head.*` as it is;
    the vision tower (llama.cpp writes it to a separate --mmproj file) and the MTP head left out."""
    for name, value in items:
        if name.startswith(TEXT_PREFIX):
            yield our_name(name), value
        elif name.startswith("lm_head."):
            yield name, value


def converted(items: Iterable[tuple[str, torch.Tensor]], config: QwenConfig,
              names: "gguf.TensorNameMap") -> Iterator[tuple[str, tuple[str, ...], str, torch.Tensor]]:
    """(checkpoint name, stacked parts, GGUF name, tensor) of every GGUF tensor, from the checkpoint's
    (name, tensor) as `checkpoint_items` gives them: experts stacked, then (hybrids) the converter's
    transformations (gguf_hybrid.hybrid_tensors). Runs on "meta" tensors to plan, on data to write."""
    for hf_name, parts, values in stack_experts(items, config):
        tensor = torch.stack(values) if parts else values[0]
        if config.family.hybrid:
            for gguf_name, out in hybrid_tensors(hf_name, tensor, config, names):
                yield hf_name, parts, gguf_name, out
        else:
            yield hf_name, parts, gguf_name_of(hf_name, names, config), tensor


def stack_experts(items: Iterable[tuple[str, Any]], config: QwenConfig) -> Iterator[tuple[str, tuple[str, ...], list]]:
    """(name, stacked parts, values) in the order they can be written: each tensor as it comes
    ((), [value]), and a layer's experts, once all its 3 x n_experts matrices have come, as three
    stacked tensors `model.layers.N.mlp.experts.{down,gate,up}_proj.weight` (the converter's
    names and order) with their parts in expert order. `items` are (checkpoint name, value)."""
    pending: dict[int, dict[tuple[str, int], tuple[str, Any]]] = {}
    for name, value in items:
        match = EXPERT.fullmatch(name)
        if match is None:
            yield name, (), [value]
            continue
        layer = pending.setdefault(int(match[1]), {})
        layer[(match[3], int(match[2]))] = (name, value)
        if len(layer) < 3 * config.num_experts:
            continue
        del pending[int(match[1])]
        for w in ("down", "gate", "up"):
            got = [layer[(w, e)] for e in range(config.num_experts)]
            yield (f"model.layers.{match[1]}.mlp.experts.{w}_proj.weight", tuple(n for n, _ in got),
                   [v for _, v in got])
    if pending:
        raise ExportError(f"the experts of layer {min(pending)} are incomplete (changed while being exported?)")


def expected_shapes(config: QwenConfig) -> dict[str, tuple[int, ...]]:
    """{checkpoint name: shape} of every tensor a model of `config` is made of (built on "meta")."""
    with torch.device("meta"):
        model = Qwen(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not skipped(k, config)}


def skipped(hf_name: str, config: QwenConfig) -> bool:
    """Tensors a GGUF leaves out: the RoPE table (recomputed) and a tied head (it is the embedding)."""
    return hf_name.endswith("rotary_emb.inv_freq") or (config.tie_word_embeddings and hf_name == "lm_head.weight")


def encode(tensor: torch.Tensor, plan: TensorPlan) -> np.ndarray:
    """The bytes of one GGUF tensor: F32/F16 as floats, BF16 and Q8_0 as uint8 blocks.

    Like llama.cpp's converter, a bf16 tensor goes through float32 first (exact), then gguf's
    own rounding to the target type (round to nearest even; Q8_0 as ggml-quants.c does).
    """
    if tuple(tensor.shape) != plan.shape:
        raise ExportError(f"tensor {plan.hf_name!r} has shape {list(tensor.shape)}, expected {list(plan.shape)}")
    if tensor.dtype not in (torch.float16, torch.float32):
        tensor = tensor.float()
    data = tensor.detach().cpu().contiguous().numpy()
    out = gguf.quants.quantize(data, plan.ggml_type)
    if plan.ggml_type == F16 and not np.isfinite(out).all() and np.isfinite(data).all():
        raise ExportError(f"tensor {plan.hf_name!r} has values beyond float16's range (max |x| = "
                          f"{float(np.abs(data).max()):.4g}); export with type bf16 instead")
    return out
