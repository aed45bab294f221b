"""GGUF tensors and keys of the hybrid Qwen families, as llama.cpp's converter writes them.

    qwen3_5_text     (Qwen3_5ForCausalLM)      -> llama.cpp `qwen35`     (Qwen3_5TextModel)
    qwen3_5_moe_text (Qwen3_5MoeForCausalLM)   -> llama.cpp `qwen35moe`  (Qwen3_5MoeTextModel)
    qwen3_next       (Qwen3NextForCausalLM)    -> llama.cpp `qwen3next`  (Qwen3NextModel)

The classes named are those of llama.cpp's convert_hf_to_gguf.py (conversion/qwen.py). Each
checkpoint tensor goes through, in this order:

* Qwen2MoeModel.modify_tensors: a layer's per-expert matrices stacked in expert order into
  `mlp.experts.{down,gate,up}_proj.weight` [n_expert, rows, cols] (a fused `gate_up_proj` is
  split into its gate and up rows first: the same tensors);
* _LinearAttentionVReorderBase.modify_tensors (Qwen3.5 and Qwen3.5-MoE only, when there are more
  value heads than key heads): the value heads of every Gated DeltaNet tensor reordered from
  grouped by key head to tiled ([G0v0, G0v1, G1v0, G1v1] -> [G0v0, G1v0, G0v1, G1v1]), for
  ggml's broadcast;
* Qwen3NextModel.modify_tensors: `A_log` -> -exp(A_log), `dt_bias` renamed `dt_proj.bias`, the
  conv1d kernel squeezed to [channels, kernel], every `*norm.weight` but the DeltaNet's own
  `linear_attn.norm.weight` plus 1 (zero-centred RMSNorm), and Qwen3-Next's fused
  `in_proj_qkvz` regrouped from [q, k, v, z] per key head into `attn_qkv` = [all q, all k, all v]
  and `attn_gate` = [all z] (`in_proj_ba` is written as it is, as `ssm_ba`);
* the gguf package's name table for the architecture (tensor_mapping.py).

A bf16 checkpoint goes to float32 before all this (ModelBase.prepare_tensors), so the +1 and
-exp are float32 arithmetic; an f16 one stays f16, as in the converter.

Not written, as the converter leaves them: the MTP head (`mtp.*`: Qwen3NextModel.filter_tensors
ignores it; for Qwen3.5 this is the converter's `--no-mtp`, since the installed gguf's qwen35
tables have no nextn tensors), the RoPE table and a tied head.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import gguf
import torch

from ..config import QwenConfig, default_layer_types
from ..moe import map_fused_experts
from .errors import ExportError

# _Qwen35MRopeMixin: written when rope_parameters has no mrope_section (llama.cpp's qwen35 loaders need it).
QWEN35_DEFAULT_MROPE_SECTION = [11, 11, 10, 0]
# Qwen3NextModel.set_gguf_parameters: hparams.get("full_attention_interval", 4) and
# hparams.get("partial_rotary_factor", 0.25); transformers 5 writes neither at the top of config.json.
DEFAULT_FULL_ATTENTION_INTERVAL = 4
DEFAULT_PARTIAL_ROTARY_FACTOR = 0.25


def check_hybrid_config(model_dir: Path, config: QwenConfig, raw: dict) -> None:
    """Refuse, in one line, what llama.cpp's converter and loader would get wrong or cannot hold."""
    where = model_dir / "config.json"
    interval = int(raw.get("full_attention_interval", DEFAULT_FULL_ATTENTION_INTERVAL))
    if config.layer_types != default_layer_types(config.num_hidden_layers, interval):
        raise ExportError(f"{where}: layer_types is not every {interval}th layer full attention, the only "
                          f"layout llama.cpp's {config.model_type} loader builds (from full_attention_interval)")
    factor = raw.get("partial_rotary_factor", DEFAULT_PARTIAL_ROTARY_FACTOR)
    if config.partial_rotary_factor != factor:
        raise ExportError(f"{where}: partial_rotary_factor {config.partial_rotary_factor} (rope_parameters): "
                          f"llama.cpp's converter reads the top-level key (default {factor}); not exported")
    dense = [i for i in range(config.num_hidden_layers) if config.num_experts and not config.is_sparse_layer(i)]
    if dense:
        raise ExportError(f"{where}: layer {dense[0]} is dense (mlp_only_layers / decoder_sparse_step), which "
                          f"llama.cpp's {config.family.gguf_architecture} "
                          f"architecture has no place for")


def add_hybrid_metadata(writer: "gguf.GGUFWriter", config: QwenConfig, raw: dict) -> None:
    """The keys the converter's set_gguf_parameters chain adds beyond TextModel's (see add_metadata)."""
    rope = raw.get("rope_parameters") or {}
    if "mrope_section" in rope:   # TextModel.set_gguf_parameters, padded to 4
        writer.add_rope_dimension_sections((list(rope["mrope_section"]) + [0] * 4)[:4])
    elif config.family.gguf_default_mrope:   # _Qwen35MRopeMixin.set_gguf_parameters (Qwen3.5)
        writer.add_rope_dimension_sections(QWEN35_DEFAULT_MROPE_SECTION)
    if config.num_experts:   # Qwen2MoeModel.set_gguf_parameters (expert_count / used: TextModel's)
        writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
    # Qwen3NextModel.set_gguf_parameters
    writer.add_ssm_conv_kernel(config.linear_conv_kernel_dim)
    writer.add_ssm_state_size(config.linear_key_head_dim)
    writer.add_ssm_group_count(config.linear_num_key_heads)
    writer.add_ssm_time_step_rank(config.linear_num_value_heads)
    writer.add_ssm_inner_size(config.linear_value_head_dim * config.linear_num_value_heads)
    writer.add_full_attention_interval(int(raw.get("full_attention_interval", DEFAULT_FULL_ATTENTION_INTERVAL)))
    writer.add_rope_dimension_count(int(config.head_dim * config.partial_rotary_factor))


def hybrid_items(items: Iterable[tuple[str, torch.Tensor]], config: QwenConfig,
                 file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Checkpoint (name, tensor) minus what the converter drops (MTP head), fused experts split per expert."""
    for name, tensor in items:
        if name.startswith("mtp."):   # Qwen3NextModel.filter_tensors / --no-mtp
            continue
        yield from (map_fused_experts(name, tensor, config, file) if config.num_experts else [(name, tensor)])


def reorder_v_heads(t: torch.Tensor, dim: int, n_k: int, v_per_k: int, head_dim: int) -> torch.Tensor:
    """_LinearAttentionVReorderBase._reorder_v_heads: along `dim` (n_k * v_per_k * head_dim long),
    the heads grouped by key head [k, v, d] -> tiled [v, k, d]."""
    shape = list(t.shape)
    dim %= len(shape)
    t = t.reshape(*shape[:dim], n_k, v_per_k, head_dim, *shape[dim + 1:])
    return t.transpose(dim, dim + 1).contiguous().reshape(shape)


def _reorder_linear_attention(name: str, t: torch.Tensor, c: QwenConfig) -> torch.Tensor:
    """_LinearAttentionVReorderBase.modify_tensors (Qwen3.5, value heads > key heads)."""
    n_k, n_v = c.linear_num_key_heads, c.linear_num_value_heads
    if not c.family.gguf_reorders_v_heads or n_k == n_v or "linear_attn." not in name:
        return t
    r, dk, dv = n_v // n_k, c.linear_key_head_dim, c.linear_value_head_dim
    qk = 2 * dk * n_k
    if ".in_proj_qkv." in name:
        return torch.cat([t[:qk], reorder_v_heads(t[qk:], 0, n_k, r, dv)], dim=0)
    if ".in_proj_z." in name:
        return reorder_v_heads(t, 0, n_k, r, dv)
    if ".in_proj_b." in name or ".in_proj_a." in name:
        return reorder_v_heads(t, 0, n_k, r, 1)
    if ".A_log" in name or ".dt_bias" in name or ".dt_proj" in name:
        if t.dim() == 1:
            return reorder_v_heads(t.unsqueeze(-1), 0, n_k, r, 1).squeeze(-1)
        return reorder_v_heads(t, -1, n_k, r, 1)
    if ".conv1d" in name:
        data = t.squeeze()
        return torch.cat([data[:qk], reorder_v_heads(data[qk:], 0, n_k, r, dv)], dim=0)
    if ".out_proj." in name:
        return reorder_v_heads(t, 1, n_k, r, dv)
    return t


def split_qkvz(t: torch.Tensor, c: QwenConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3NextModel.modify_tensors on in_proj_qkvz [n_k * (2 dk + 2 r dv), hidden]: per key head
    [q, k, v, z] -> (qkv = [all q; all k; all v], z = [all z])."""
    dk, dv = c.linear_key_head_dim, c.linear_value_head_dim
    r = c.linear_num_value_heads // c.linear_num_key_heads
    split = [dk, dk, r * dv, r * dv]
    grouped = t.permute(1, 0).contiguous().view(-1, c.linear_num_key_heads, sum(split))
    q, k, v, z = (p.contiguous().view(c.hidden_size, -1) for p in torch.split(grouped, split, dim=-1))
    return torch.cat([q, k, v], dim=-1).permute(1, 0).contiguous(), z.permute(1, 0).contiguous()


def hybrid_tensors(name: str, t: torch.Tensor, config: QwenConfig,
                   names: "gguf.TensorNameMap") -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) for one (stacked) checkpoint tensor, as the converter's modify_tensors chain."""
    if t.dtype not in (torch.float16, torch.float32):   # ModelBase.prepare_tensors, before modify_tensors
        t = t.float()
    t = _reorder_linear_attention(name, t, config)
    # Qwen3NextModel.modify_tensors (in float16 for an f16 checkpoint, float32 otherwise, as the converter)
    if name.endswith(".A_log"):
        t = -torch.exp(t)
    elif name.endswith(".dt_bias"):
        name = name.rpartition(".dt_bias")[0] + ".dt_proj.bias"
    elif "conv1d" in name:
        t = t.squeeze()
    elif name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
        t = t + 1
    if "in_proj_qkvz.weight" in name:
        bid = int(name.split(".")[2])
        qkv, z = split_qkvz(t, config)
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ATTN_QKV].format(bid=bid) + ".weight", qkv
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ATTN_GATE].format(bid=bid) + ".weight", z
        return
    yield gguf_name_of(name, names, config), t


def gguf_name_of(name: str, names: "gguf.TensorNameMap", config: QwenConfig) -> str:
    """The gguf package's name for a checkpoint tensor (tensor_mapping.py), or a one-line error."""
    gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
    if gguf_name is None:
        raise ExportError(f"tensor {name!r} has no GGUF name for model_type {config.model_type!r}")
    return gguf_name


__all__ = ["check_hybrid_config", "add_hybrid_metadata", "hybrid_items", "hybrid_tensors",
           "gguf_name_of", "reorder_v_heads", "split_qkvz"]
