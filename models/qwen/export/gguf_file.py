"""Write a GGUF file (llama.cpp, Ollama) from an HF-format Qwen2/Qwen3/Qwen3-MoE/Qwen3.5/Qwen3.5-MoE/Qwen3-Next
model directory.

    from models.qwen.export import export_gguf
    summary = export_gguf("runs/sft/merged", "runs/gguf/model-q8_0.gguf", file_type="q8_0")

The file holds what llama.cpp's convert_hf_to_gguf.py writes for these models: the
architecture (`qwen2` / `qwen3` / `qwen3moe` / `qwen35` / `qwen35moe` / `qwen3next`), its
hyper-parameters under the gguf package's key names,
the tokenizer with its chat template (see gguf_vocab.py) and the tensors (see gguf_tensors.py,
and gguf_hybrid.py for the families with Gated DeltaNet layers).
Tensors are streamed: the header is written from the safetensors headers, then each tensor
is read, converted and appended in turn, so memory holds one tensor at a time. The file is
written next to its final name and renamed into place when complete.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import gguf
import numpy as np

from ..checkpoint import checkpoint_files, iter_tensors
from ..config import ConfigError, QwenConfig
from fileio.safe_load import loads_json
from .errors import ExportError
from .gguf_hybrid import add_hybrid_metadata, check_hybrid_config
from .gguf_tensors import (FILE_TYPES, gguf_architecture, TensorPlan, check_file_type, checkpoint_items, converted, encode,
                           plan_tensors)
from .gguf_vocab import read_vocab

PathLike = Union[str, os.PathLike]


@dataclass
class ExportSummary:
    """What was written: the file, its architecture, size and how many tensors of each type."""

    path: Path
    architecture: str
    file_type: str
    n_tensors: int
    n_params: int
    n_bytes: int
    tensor_types: dict[str, int] = field(default_factory=dict)
    eos_token: str = ""


def export_gguf(model_dir: PathLike, out: PathLike, file_type: str = "f16",
                name: Optional[str] = None) -> ExportSummary:
    """Convert the model in `model_dir` to a GGUF file at `out` (replaced if it exists).

    file_type: "f16", "bf16" or "q8_0" (the type of the matrices; norms and biases stay F32).
    name: `general.name` in the file (default: the directory's name).
    """
    model_dir = Path(model_dir)
    out = Path(out)
    check_file_type(file_type)
    config = read_config(model_dir)
    plans = plan_tensors(model_dir, config, file_type)
    vocab = read_vocab(model_dir, config)

    arch = config.family.gguf_architecture
    writer = gguf.GGUFWriter(path=None, arch=arch)
    n_params = sum(p.numel for p in plans)
    add_metadata(writer, config, file_type, name or model_dir.resolve().name, raw_config(model_dir, config))
    vocab.add_to(writer)
    for p in plans:
        # With raw_dtype given, a non-uint8 dtype tells the writer `p.shape` is the logical shape.
        writer.add_tensor_info(p.gguf_name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.ggml_type)
    # The converter's label ("8B", "30B-A3B" for experts) from the writer's own count of the tensors.
    writer.add_size_label(gguf.size_label(*writer.get_total_parameter_count()))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        _write_tensor_data(writer, model_dir, plans, config)
        writer.flush()
        os.fsync(writer.fout[0].fileno())
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return ExportSummary(
        path=out, architecture=arch, file_type=file_type, n_tensors=len(plans), n_params=n_params,
        n_bytes=out.stat().st_size, tensor_types=dict(Counter(p.ggml_type.name for p in plans)),
        eos_token=vocab.tokens[vocab.eos_id],
    )


def read_config(model_dir: Path) -> QwenConfig:
    """config.json of a model GGUF export covers (Qwen-7B v1 checkpoints are refused: other names)."""
    if not model_dir.is_dir():
        raise ExportError(f"{model_dir}: not a directory (expected an HF-format Qwen model directory)")
    try:
        config = QwenConfig.from_hf(model_dir)
    except ConfigError as e:
        raise ExportError(str(e)) from None
    family = config.family
    if family.hybrid:
        check_hybrid_config(model_dir, config, raw_config(model_dir, config))
    if family.gguf_architecture is None:   # e.g. Qwen-7B v1: its family says what to do instead
        raise ExportError(f"{model_dir}: {family.gguf_refusal}")
    dense = [i for i in range(config.num_hidden_layers) if not config.is_sparse_layer(i)]
    if config.num_experts and dense:   # (the hybrids' check_hybrid_config has refused theirs)
        raise ExportError(f"{model_dir / 'config.json'}: layer {dense[0]} is dense (mlp_only_layers / "
                          f"decoder_sparse_step), which llama.cpp's {family.gguf_architecture} architecture has "
                          f"no place for")
    return config


def raw_config(model_dir: Path, config: QwenConfig) -> dict:
    """config.json as written (read_config has checked it): the converter's `hparams` of the text
    model `config` was parsed from (a vision-language checkpoint's `text_config`)."""
    raw = loads_json((model_dir / "config.json").read_text(encoding="utf-8"))
    return config.family.text_config(raw, config)


def add_metadata(writer: "gguf.GGUFWriter", config: QwenConfig, file_type: str, name: str,
                 raw: Optional[dict] = None) -> None:
    """general.* and the architecture's hyper-parameters, as llama.cpp's TextModel (and, for the
    hybrids, the converter's set_gguf_parameters chain) writes them. raw: config.json's keys."""
    raw = raw or {}
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    if not config.family.hybrid or "intermediate_size" in raw:   # Qwen3.5-MoE has none
        writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    # Qwen3's head_dim is not hidden/heads; llama.cpp reads it from key/value length.
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    if config.num_experts:   # TextModel (counts) and Qwen2MoeModel.set_gguf_parameters (width)
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    if config.family.hybrid:
        add_hybrid_metadata(writer, config, raw)
    writer.add_file_type(FILE_TYPES[file_type][0])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_tensor_data(writer: "gguf.GGUFWriter", model_dir: Path, plans: list[TensorPlan], config: QwenConfig) -> None:
    """Append each planned tensor's bytes, reading the checkpoint one tensor at a time."""
    pending = iter(plans)
    names = gguf.get_tensor_name_map(gguf_architecture(config), config.num_hidden_layers)
    tensors = (item for name, tensor, file in iter_tensors(checkpoint_files(model_dir))
               for item in checkpoint_items([(name, tensor)], config, file))
    for hf_name, parts, gguf_name, tensor in converted(tensors, config, names):
        plan = next(pending, None)
        if plan is None or (plan.hf_name, plan.parts, plan.gguf_name) != (hf_name, parts, gguf_name):
            raise ExportError(f"{model_dir}: changed while it was being exported (read {hf_name!r}, expected "
                              f"{plan.hf_name if plan else 'no more tensors'!r})")
        writer.write_tensor_data(encode(tensor, plan))
    left = next(pending, None)
    if left is not None:
        raise ExportError(f"{model_dir}: changed while it was being exported (tensor {left.hf_name!r} went missing)")


__all__ = ["export_gguf", "ExportSummary", "read_config", "add_metadata"]
