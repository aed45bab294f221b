"""QwenConfig: the shape of a Qwen decoder, read from (and written to) an HF `config.json`.

Six checkpoint families map onto one config:

* ``Qwen2ForCausalLM`` (Qwen2, Qwen2.5): q/k/v projections with bias, o_proj without.
* ``Qwen3ForCausalLM``: no qkv bias, RMSNorm on q and k per head, explicit ``head_dim``.
* ``Qwen3_5ForCausalLM`` (model_type ``qwen3_5_text``), also read from the text part of a
  ``qwen3_5`` (``Qwen3_5ForConditionalGeneration``) checkpoint: a hybrid stack of Gated DeltaNet
  linear-attention layers and gated full-attention layers (``layer_types``), zero-centred
  RMSNorms and partial rotary embeddings. See models/qwen/qwen35.py and linear_attention.py.
* ``Qwen3MoeForCausalLM`` (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3 attention; the MLP of a
  sparse layer is a router over ``num_experts`` SwiGLU experts of width ``moe_intermediate_size``
  (top ``num_experts_per_tok``), see moe.py; layers in ``mlp_only_layers`` or off the
  ``decoder_sparse_step`` grid keep a dense MLP of ``intermediate_size``.
* ``Qwen3_5MoeForCausalLM`` (model_type ``qwen3_5_moe_text``, Qwen3.5-35B-A3B and larger), also read
  from the text part of a ``qwen3_5_moe`` checkpoint: Qwen3.5's hybrid layers, and in *every* layer
  the MLP is routed experts (softmax, top-k, always renormalised) plus a shared SwiGLU expert of
  ``shared_expert_intermediate_size`` scaled by sigmoid(``shared_expert_gate``); no dense MLP, so
  ``intermediate_size`` is 0. Its config has no norm_topk_prob / decoder_sparse_step /
  mlp_only_layers (such keys are kept in `extra`, unused, as transformers ignores them).
* ``Qwen3NextForCausalLM`` (model_type ``qwen3_next``, Qwen3-Next-80B-A3B, Qwen3-Coder-Next): the
  hybrid stack of Qwen3.5 with fused linear-attention projections and Qwen3-MoE's placement of
  routed + shared-expert layers; its config.json is read and written in models/qwen/qwen3_next.py.
* ``QWenLMHeadModel`` (Qwen-7B v1, remote code): fused ``c_attn`` with bias,
  ``intermediate_size`` is twice the MLP width, ``kv_channels``, ``rotary_emb_base``,
  ``layer_norm_epsilon``. Its weights are mapped onto the Qwen2 module names on load.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .errors import ConfigError  # noqa: F401  (re-exported)
from .rope import check_rope_scaling
from fileio.safe_load import read_json
from .special_tokens import ENDOFTEXT_ID

_DTYPE_NAMES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}


FULL_ATTENTION = "full_attention"
LINEAR_ATTENTION = "linear_attention"
# model_type -> the transformers class that config.json names.
ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen3_5_text": "Qwen3_5ForCausalLM",
    "qwen3_5_moe_text": "Qwen3_5MoeForCausalLM",
    "qwen3_next": "Qwen3NextForCausalLM",  # the family module: qwen3_next.py
}
MODEL_TYPES = tuple(ARCHITECTURES)
# the hybrid Gated DeltaNet stack (Qwen3-Next was its first release)
QWEN35_MODEL_TYPES = ("qwen3_5_text", "qwen3_5_moe_text", "qwen3_next")
MOE_MODEL_TYPES = ("qwen3_moe", "qwen3_5_moe_text", "qwen3_next")
SHARED_EXPERT_MODEL_TYPES = ("qwen3_5_moe_text", "qwen3_next")  # routed + gated shared expert
# The multimodal checkpoint types whose text model (under model.language_model.) we read.
QWEN35_NESTED = {"qwen3_5": "qwen3_5_text", "qwen3_5_moe": "qwen3_5_moe_text"}
# Qwen3MoeConfig's defaults in transformers (used for keys a qwen3_moe config.json leaves out).
MOE_DEFAULTS = dict(num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=False,
                    decoder_sparse_step=1, output_router_logits=False, router_aux_loss_coef=0.001)
LINEAR_ATTENTION_KEYS = (
    "linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim",
    "linear_num_key_heads", "linear_num_value_heads",
)
# Qwen3_5MoeTextConfig's defaults for its MoE keys (its router always renormalises the top-k).
QWEN35_MOE_DEFAULTS = dict(num_experts=256, num_experts_per_tok=8, moe_intermediate_size=512,
                           shared_expert_intermediate_size=512, output_router_logits=False,
                           router_aux_loss_coef=0.001)
# Qwen3_5TextConfig's defaults for keys a config.json may leave out.
QWEN35_TEXT_DEFAULTS = dict(
    head_dim=256, linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128,
    linear_num_key_heads=16, linear_num_value_heads=32,
)


def default_layer_types(num_layers: int, full_attention_interval: int = 4) -> list[str]:
    """HF's Qwen3.5 default: every `full_attention_interval`-th layer is full attention."""
    return [FULL_ATTENTION if (i + 1) % full_attention_interval == 0 else LINEAR_ATTENTION for i in range(num_layers)]



def merge_eos(*values: Any) -> Any:
    """One eos_token_id value from several (each an id, a list of ids or None), in order and
    without repeats: an int when one id remains, a list when several (generation_config.json's
    `[151645, 151643]` makes HF's generate stop at either), None when none."""
    ids: list = []
    for value in values:
        for i in ([] if value is None else value if isinstance(value, (list, tuple)) else [value]):
            if i not in ids:
                ids.append(i)
    return None if not ids else ids[0] if len(ids) == 1 else ids


def dtype_from_name(name: Any) -> Optional[torch.dtype]:
    """'bfloat16' / 'bf16' / torch.bfloat16 -> torch.bfloat16; None stays None."""
    if name is None or isinstance(name, torch.dtype):
        return name
    key = str(name).replace("torch.", "")
    if key not in _DTYPE_NAMES:
        raise ConfigError(f"unknown dtype {name!r}: expected one of {sorted(_DTYPE_NAMES)}")
    return _DTYPE_NAMES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16' (the spelling HF configs use)."""
    return str(dtype).replace("torch.", "")


def dtype_name_short(name: Any) -> str:
    """'bfloat16' / torch.bfloat16 / 'bf16' -> 'bf16' (the spelling of the --dtype flags)."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype_from_name(name), "bf16")


@dataclass
class QwenConfig:
    """Hyper-parameters of a Qwen decoder; names follow HF's Qwen2Config/Qwen3Config."""

    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    head_dim: Optional[int] = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    # bias on q/k/v (Qwen2: True; Qwen3: False, and then on o_proj too). None: the family's
    # default (True, except False for Qwen3.5).
    attention_bias: Optional[bool] = None
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    model_type: str = "qwen2"  # one of MODEL_TYPES (v1 checkpoints load as qwen2)
    bos_token_id: Optional[int] = ENDOFTEXT_ID
    eos_token_id: Any = ENDOFTEXT_ID  # int or list of ints
    pad_token_id: Optional[int] = None
    torch_dtype: str = "bfloat16"
    source_format: str = "hf"  # "hf", "qwen-v1" or "qwen3_5" (text under model.language_model.)
    # --- RoPE scaling (rope.py). None: plain RoPE; else e.g. {"rope_type": "yarn", "factor": 4.0,
    # "original_max_position_embeddings": 32768}: the rope_parameters of config.json but rope_theta.
    rope_scaling: Optional[dict] = None
    # --- Qwen3-MoE (moe.py); num_experts 0 = a dense model. Names follow Qwen3MoeConfig.
    num_experts: int = 0
    num_experts_per_tok: int = MOE_DEFAULTS["num_experts_per_tok"]
    moe_intermediate_size: int = MOE_DEFAULTS["moe_intermediate_size"]
    norm_topk_prob: bool = MOE_DEFAULTS["norm_topk_prob"]  # renormalise the top-k probabilities to sum 1
    decoder_sparse_step: int = MOE_DEFAULTS["decoder_sparse_step"]  # layer i sparse iff (i + 1) % step == 0 ...
    mlp_only_layers: list = field(default_factory=list)  # ... and i not in this list
    output_router_logits: bool = MOE_DEFAULTS["output_router_logits"]  # add the load-balancing loss to the loss
    router_aux_loss_coef: float = MOE_DEFAULTS["router_aux_loss_coef"]
    # Qwen3.5-MoE: width of the shared expert every token passes through (0: none, as in Qwen3-MoE)
    shared_expert_intermediate_size: int = 0
    extra: dict = field(default_factory=dict)  # unknown keys of config.json, written back on save
    # ---- Qwen3.5 text models only (model_type "qwen3_5_text" or "qwen3_5_moe_text"); defaults are HF's Qwen3_5TextConfig.
    layer_types: Optional[list] = None  # per layer "linear_attention" | "full_attention"; None: all full
    partial_rotary_factor: float = 1.0  # fraction of head_dim that RoPE rotates (Qwen3.5: 0.25)
    linear_conv_kernel_dim: int = 4  # Gated DeltaNet: width of the depthwise causal conv
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32  # a multiple of linear_num_key_heads (q/k heads are shared)

    def __post_init__(self) -> None:
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, key)
            if key == "intermediate_size" and value == 0 and self.model_type == "qwen3_5_moe_text":
                continue  # every Qwen3.5-MoE layer is sparse: there is no dense MLP
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{key} = {value!r}: expected a positive integer")
        if self.head_dim is not None and (not isinstance(self.head_dim, int) or self.head_dim <= 0 or self.head_dim % 2):
            raise ConfigError(f"head_dim = {self.head_dim!r}: expected a positive even integer (rotary halves)")
        if not self.rms_norm_eps > 0 or not self.rope_theta > 0:
            raise ConfigError(f"rms_norm_eps = {self.rms_norm_eps!r}, rope_theta = {self.rope_theta!r}: expected numbers > 0")
        if self.attention_bias is None:
            self.attention_bias = self.model_type not in QWEN35_MODEL_TYPES
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; give head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type {self.model_type!r}: expected one of {MODEL_TYPES}")
        if self.is_qwen35:
            self._check_qwen35()
        elif self.layer_types is not None and set(self.layer_types) != {FULL_ATTENTION}:
            raise ConfigError(f"layer_types {self.layer_types}: linear attention needs model_type 'qwen3_5_text' "
                              "or 'qwen3_5_moe_text'")
        problem = check_rope_scaling(self.rope_scaling)
        if problem:
            raise ConfigError(problem)
        self._check_moe()

    def _check_qwen35(self) -> None:
        """Qwen3.5: layer_types default to HF's pattern (every 4th layer full attention)."""
        if self.layer_types is None:
            self.layer_types = default_layer_types(self.num_hidden_layers)
        self.layer_types = list(self.layer_types)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries, expected num_hidden_layers={self.num_hidden_layers}"
            )
        unknown = sorted(set(self.layer_types) - {FULL_ATTENTION, LINEAR_ATTENTION})
        if unknown:
            raise ConfigError(f"layer_types: unknown layer type {unknown[0]!r}: expected {FULL_ATTENTION!r} or {LINEAR_ATTENTION!r}")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ConfigError(
                f"linear_num_value_heads {self.linear_num_value_heads} must be a multiple of "
                f"linear_num_key_heads {self.linear_num_key_heads}"
            )
        if not 0.0 < self.partial_rotary_factor <= 1.0 or self.rotary_dim % 2:
            raise ConfigError(
                f"partial_rotary_factor {self.partial_rotary_factor}: expected (0, 1] giving an even number of "
                f"rotated dims of head_dim {self.head_dim} (got {self.rotary_dim})"
            )
        self.qk_norm = True  # Qwen3.5's full attention always normalises q and k per head

    def _check_moe(self) -> None:
        """The MoE fields are consistent (a dense config: num_experts 0, nothing else checked)."""
        if self.model_type in MOE_MODEL_TYPES and self.num_experts <= 0:
            raise ConfigError(f"model_type {self.model_type!r} needs num_experts > 0, got {self.num_experts}")
        if self.num_experts and self.model_type not in MOE_MODEL_TYPES:
            raise ConfigError(f"num_experts {self.num_experts} needs model_type 'qwen3_moe', 'qwen3_5_moe_text' or "
                              f"'qwen3_next', got {self.model_type!r}")
        shared = self.shared_expert_intermediate_size
        if self.model_type in SHARED_EXPERT_MODEL_TYPES and (
                isinstance(shared, bool) or not isinstance(shared, int) or shared <= 0):
            raise ConfigError(f"shared_expert_intermediate_size = {shared!r}: model_type {self.model_type!r} "
                              "needs a positive integer (its MoE block always has a shared expert)")
        if self.model_type == "qwen3_5_moe_text":
            if self.decoder_sparse_step != 1 or self.mlp_only_layers:
                raise ConfigError(
                    f"decoder_sparse_step {self.decoder_sparse_step} / mlp_only_layers {self.mlp_only_layers}: every "
                    "Qwen3.5-MoE layer is sparse (expected 1 / [])"
                )
            self.norm_topk_prob = True  # Qwen3_5MoeTopKRouter always renormalises the top-k weights
        elif shared and self.model_type not in SHARED_EXPERT_MODEL_TYPES:
            raise ConfigError(f"shared_expert_intermediate_size {shared} needs model_type 'qwen3_5_moe_text' or "
                              f"'qwen3_next', got {self.model_type!r}")
        if not self.num_experts:
            return
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(
                f"num_experts_per_tok {self.num_experts_per_tok} must be between 1 and num_experts {self.num_experts}"
            )
        if self.decoder_sparse_step < 1:
            raise ConfigError(f"decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}")
        bad = [i for i in self.mlp_only_layers if not isinstance(i, int) or not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ConfigError(
                f"mlp_only_layers holds {bad[0]!r}: expected layer indices in [0, {self.num_hidden_layers})"
            )

    def is_sparse_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer `layer_idx` has a mixture-of-experts MLP (Qwen3MoeDecoderLayer's rule)."""
        return (
            self.num_experts > 0
            and layer_idx not in self.mlp_only_layers
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "QwenConfig":
        """A named shape: 'tiny', 'qwen2.5-0.5b', '1.5b', '3b', '7b', 'qwen3-0.6b', ... ."""
        key = name.lower().replace("qwen2.5-", "").replace("qwen2-", "")
        if key not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}: expected one of {sorted(PRESETS)}")
        values = dict(PRESETS[key])
        values.update(overrides)
        return cls(**values)

    # ------------------------------------------------------------------ HF I/O
    @classmethod
    def from_hf(cls, path_or_dict: Any) -> "QwenConfig":
        """Read a model directory's config.json (or its parsed dict)."""
        source = "config dict"
        if isinstance(path_or_dict, dict):
            raw = dict(path_or_dict)
        else:
            path = os.fspath(path_or_dict)
            file = os.path.join(path, "config.json") if os.path.isdir(path) else path
            source = file
            if not os.path.exists(file):
                raise ConfigError(f"{file}: not found (a Qwen checkpoint directory holds config.json)")
            raw = read_json(file, ConfigError, dict)
        try:
            check_numbers(raw, source)
            return cls._from_hf_dict(raw, source)
        except ConfigError as e:
            raise ConfigError(str(e) if str(e).startswith(source) else f"{source}: {e}") from None
        except (TypeError, ValueError) as e:   # int("abc"), float(None): a value of the wrong kind
            raise ConfigError(f"{source}: a value has the wrong type ({e})") from None

    @classmethod
    def _from_hf_dict(cls, raw: dict, source: str) -> "QwenConfig":
        archs = raw.get("architectures") or []
        model_type = raw.get("model_type")
        if model_type == "qwen" or "QWenLMHeadModel" in archs:
            return cls._from_v1(raw, source)
        if model_type == "qwen3_next":
            from .qwen3_next import config_from_hf

            return config_from_hf(raw, source)
        if model_type in QWEN35_MODEL_TYPES or model_type in QWEN35_NESTED:
            return cls._from_qwen35(raw, source)
        if model_type not in ("qwen2", "qwen3", "qwen3_moe"):
            expected = ", ".join(f"{t!r} ({a})" for t, a in ARCHITECTURES.items())
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not supported: expected {expected}, 'qwen3_5' / "
                f"'qwen3_5_moe' (the text part of Qwen3_5[Moe]ForConditionalGeneration) or 'qwen' (QWenLMHeadModel)"
            )
        for arch in archs:
            if arch != ARCHITECTURES[model_type]:
                raise ConfigError(
                    f"{source}: architecture {arch!r} is not supported for model_type {model_type!r} "
                    f"(expected {ARCHITECTURES[model_type]!r})"
                )

        def need(key: str) -> Any:
            if key not in raw:
                raise ConfigError(f"{source}: missing required key {key!r}")
            return raw[key]

        if raw.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window=true is not supported")
        rope_theta, rope_scaling = _rope_from_hf(raw, source)
        qwen3 = model_type in ("qwen3", "qwen3_moe")
        known = {
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
            "rope_theta", "rope_parameters", "rope_scaling", "rms_norm_eps", "tie_word_embeddings",
            "attention_bias", "model_type", "architectures", "bos_token_id", "eos_token_id",
            "pad_token_id", "torch_dtype", "dtype", "transformers_version", "use_sliding_window",
            "partial_rotary_factor", "original_max_position_embeddings",
            *MOE_DEFAULTS, "num_experts", "num_local_experts", "mlp_only_layers",
        }
        moe = _moe_from_hf(raw, source) if model_type == "qwen3_moe" else {}
        dtype = raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"
        n_heads = int(need("num_attention_heads"))
        return cls(
            vocab_size=int(need("vocab_size")),
            hidden_size=int(need("hidden_size")),
            intermediate_size=int(need("intermediate_size")),
            num_hidden_layers=int(need("num_hidden_layers")),
            num_attention_heads=n_heads,
            num_key_value_heads=int(raw.get("num_key_value_heads") or n_heads),
            head_dim=raw.get("head_dim"),
            max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            # HF's default for tie_word_embeddings is True in v4 and False in v5 for Qwen2;
            # real Qwen checkpoints always write the key. Absent: follow the common case.
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", not qwen3)),
            qk_norm=qwen3,
            model_type=model_type,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=raw.get("eos_token_id"),
            pad_token_id=raw.get("pad_token_id"),
            torch_dtype=dtype_name(dtype_from_name(dtype)),
            extra={k: v for k, v in raw.items() if k not in known},
            **moe,
        )

    @classmethod
    def _from_qwen35(cls, raw: dict, source: str) -> "QwenConfig":
        """Qwen3.5 text: `qwen3_5_text` (Qwen3_5ForCausalLM), `qwen3_5_moe_text` (Qwen3_5MoeForCausalLM),
        or the `text_config` of a `qwen3_5` / `qwen3_5_moe` (Qwen3_5[Moe]ForConditionalGeneration)
        checkpoint, whose weights sit under model.language_model."""
        outer = raw.get("model_type")
        nested = outer in QWEN35_NESTED
        model_type = QWEN35_NESTED.get(outer, outer)
        moe = model_type == "qwen3_5_moe_text"
        archs = raw.get("architectures") or []
        allowed = ARCHITECTURES[model_type]
        if nested:
            allowed = allowed.replace("ForCausalLM", "ForConditionalGeneration")
        for arch in archs:
            if arch != allowed:
                raise ConfigError(f"{source}: architecture {arch!r} is not supported (expected {allowed!r})")
        text = raw
        if nested:
            text = raw.get("text_config")
            if not isinstance(text, dict):
                raise ConfigError(f"{source}: model_type {outer!r} needs a 'text_config' object")
            source = f"{source} (text_config)"

        def need(key: str) -> Any:
            if key not in text:
                raise ConfigError(f"{source}: missing required key {key!r}")
            return text[key]

        rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise ConfigError(f"{source}: rope type {rope_type!r} is not supported (only default RoPE)")
        # mrope_section / mrope_interleaved place the 3 position axes of images and video; text
        # tokens have equal positions on all axes, which makes them plain RoPE.
        known = {
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_theta", "rope_parameters",
            "rope_scaling", "partial_rotary_factor", "rms_norm_eps", "tie_word_embeddings", "attention_bias",
            "model_type", "architectures", "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype",
            "dtype", "transformers_version", "layer_types", "full_attention_interval", "hidden_act",
            "linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads",
            "linear_num_value_heads",
        }
        if moe:  # (intermediate_size is no key of Qwen3_5MoeTextConfig: a dense width no layer has)
            known = (known - {"intermediate_size"}) | set(QWEN35_MOE_DEFAULTS)
        if text.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act {text['hidden_act']!r} is not supported (expected 'silu')")
        layers = int(need("num_hidden_layers"))
        layer_types = text.get("layer_types") or default_layer_types(layers, int(text.get("full_attention_interval", 4)))
        n_heads = int(need("num_attention_heads"))
        top = raw if nested else {}
        tie = top.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
        dtype = text.get("torch_dtype") or text.get("dtype") or top.get("torch_dtype") or top.get("dtype") or "bfloat16"
        defaults = QWEN35_TEXT_DEFAULTS
        return cls(
            vocab_size=int(need("vocab_size")),
            hidden_size=int(need("hidden_size")),
            intermediate_size=0 if moe else int(need("intermediate_size")),
            num_hidden_layers=layers,
            num_attention_heads=n_heads,
            num_key_value_heads=int(text.get("num_key_value_heads") or n_heads),
            head_dim=int(text.get("head_dim") or defaults["head_dim"]),
            max_position_embeddings=int(text.get("max_position_embeddings", 32768)),
            rope_theta=float(text.get("rope_theta", rope.get("rope_theta", 10000.0))),
            partial_rotary_factor=float(rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25))),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(tie),
            attention_bias=bool(text.get("attention_bias", False)),
            qk_norm=True,
            model_type=model_type,
            bos_token_id=text.get("bos_token_id", top.get("bos_token_id")),
            eos_token_id=text.get("eos_token_id", top.get("eos_token_id")),
            pad_token_id=text.get("pad_token_id", top.get("pad_token_id")),
            torch_dtype=dtype_name(dtype_from_name(dtype)),
            source_format="qwen3_5" if nested else "hf",
            extra={k: v for k, v in text.items() if k not in known},
            layer_types=list(layer_types),
            **{k: int(text.get(k, defaults[k])) for k in LINEAR_ATTENTION_KEYS},
            **(_qwen35_moe_from_hf(text, source) if moe else {}),
        )

    @classmethod
    def _from_v1(cls, raw: dict, source: str) -> "QwenConfig":
        """Qwen-7B v1 (`QWenLMHeadModel`): MHA, fused c_attn with bias, MLP width = intermediate/2."""

        def need(key: str) -> Any:
            if key not in raw:
                raise ConfigError(f"{source}: missing required key {key!r} (Qwen v1 config)")
            return raw[key]

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        head_dim = int(raw.get("kv_channels", hidden // heads))
        if raw.get("rotary_pct", 1.0) != 1.0:
            raise ConfigError(f"{source}: rotary_pct {raw['rotary_pct']} is not supported (expected 1.0)")
        dtype = "bfloat16"
        if raw.get("fp16"):
            dtype = "float16"
        if raw.get("fp32"):
            dtype = "float32"
        return cls(
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")) // 2,
            num_hidden_layers=int(need("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=heads,
            head_dim=head_dim,
            max_position_embeddings=int(raw.get("max_position_embeddings", raw.get("seq_length", 8192))),
            rope_theta=float(raw.get("rotary_emb_base", 10000.0)),
            rms_norm_eps=float(raw.get("layer_norm_epsilon", 1e-6)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=True,
            qk_norm=False,
            model_type="qwen2",
            bos_token_id=ENDOFTEXT_ID,
            eos_token_id=ENDOFTEXT_ID,
            pad_token_id=None,
            torch_dtype=dtype,
            source_format="qwen-v1",
        )

    def _hf_common(self) -> dict:
        """The config.json keys every family writes (unknown keys read from disk kept under them)."""
        out = dict(self.extra)
        out.update(
            architectures=[ARCHITECTURES[self.model_type]],
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_act="silu",
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            attention_bias=self.attention_bias,
            attention_dropout=0.0,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            dtype=self.torch_dtype,
            use_cache=True,
        )
        return out

    def to_hf(self) -> dict:
        """The config.json dict that transformers' class for this model_type (ARCHITECTURES) loads."""
        if self.model_type == "qwen3_next":
            from .qwen3_next import config_to_hf

            return config_to_hf(self, self._hf_common())
        if self.is_qwen35:
            return self._to_hf_qwen35()
        out = self._hf_common()
        out.update(
            intermediate_size=self.intermediate_size,
            rope_theta=self.rope_theta,
            # transformers v5 reads rope_parameters; v4 reads rope_theta. Write both.
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta, **(self.rope_scaling or {})},
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=self.num_hidden_layers,
            torch_dtype=self.torch_dtype,
        )
        if self.rope_scaling:
            # v4, vLLM and llama.cpp's converter read the legacy key (v5 prefers it when present).
            out["rope_scaling"] = dict(self.rope_scaling)
        if self.model_type == "qwen3_moe":
            out.update(
                # The published checkpoints' spelling (transformers also accepts num_local_experts).
                num_experts=self.num_experts,
                num_experts_per_tok=self.num_experts_per_tok,
                moe_intermediate_size=self.moe_intermediate_size,
                norm_topk_prob=self.norm_topk_prob,
                decoder_sparse_step=self.decoder_sparse_step,
                mlp_only_layers=list(self.mlp_only_layers),
                output_router_logits=self.output_router_logits,
                router_aux_loss_coef=self.router_aux_loss_coef,
            )
        return out

    def _to_hf_qwen35(self) -> dict:
        """A text-only `qwen3_5_text` / `qwen3_5_moe_text` config (Qwen3_5[Moe]ForCausalLM); for a
        model read from a `qwen3_5[_moe]` checkpoint, `save` writes that checkpoint's own config
        with the values of this one that changed (models/qwen/whole.py)."""
        out = self._hf_common()
        out.update(
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta,
                             "partial_rotary_factor": self.partial_rotary_factor},
            layer_types=list(self.layer_types),
            **{k: getattr(self, k) for k in LINEAR_ATTENTION_KEYS},
        )
        if self.num_experts:  # Qwen3_5MoeTextConfig's keys (no norm_topk_prob: it always renormalises)
            out.update({k: getattr(self, k) for k in QWEN35_MOE_DEFAULTS})
        else:
            out["intermediate_size"] = self.intermediate_size
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ sizes
    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    # ---- the hybrid layer stack (Qwen3.5); every other family is all full attention
    @property
    def is_qwen35(self) -> bool:
        """Qwen3.5 text (dense or MoE): zero-centred norms, gated full attention, Gated DeltaNet layers."""
        return self.model_type in QWEN35_MODEL_TYPES

    def layer_type(self, layer_idx: int) -> str:
        """'full_attention' or 'linear_attention' for decoder layer `layer_idx`."""
        return self.layer_types[layer_idx] if self.layer_types is not None else FULL_ATTENTION

    @property
    def rotary_dim(self) -> int:
        """How many leading dims of each head RoPE rotates (head_dim unless partial rotary)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def linear_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def linear_conv_dim(self) -> int:
        """Channels of the causal conv: the fused [q | k | v] projection of a linear layer."""
        return 2 * self.linear_key_dim + self.linear_value_dim

    def eos_ids(self) -> list[int]:
        """Every id that ends generation according to the config (always a list)."""
        eos = self.eos_token_id
        if eos is None:
            return [ENDOFTEXT_ID]
        return list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]

    def num_parameters(self) -> int:
        """Parameter count of the model this config describes (tied head counted once)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        gate = 2 if self.is_qwen35 else 1  # Qwen3.5's q_proj also yields the output gate
        attn = gate * h * self.q_size + 2 * h * self.kv_size + self.q_size * h
        if self.attention_bias:
            o_bias = self.model_type != "qwen2"
            attn += gate * self.q_size + 2 * self.kv_size + (h if o_bias else 0)
        if self.qk_norm:
            attn += 2 * d
        sparse = self.num_experts * (3 * h * self.moe_intermediate_size + h)  # experts + router row
        if self.shared_expert_intermediate_size:  # Qwen3.5-MoE: shared expert + its gate row
            sparse += 3 * h * self.shared_expert_intermediate_size + h
        mlps = sum(sparse if self.is_sparse_layer(n) else 3 * h * i for n in range(self.num_hidden_layers))
        norms = 2 * h * self.num_hidden_layers
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        if not self.is_qwen35:
            return emb + self.num_hidden_layers * attn + mlps + norms + h
        hv = self.linear_num_value_heads
        linear = (h * (self.linear_conv_dim + self.linear_value_dim + 2 * hv)  # in_proj_qkv, _z, _b, _a
                  + self.linear_conv_dim * self.linear_conv_kernel_dim  # depthwise conv
                  + 2 * hv + self.linear_value_head_dim  # dt_bias, A_log, gated norm
                  + self.linear_value_dim * h)  # out_proj
        n_linear = self.layer_types.count(LINEAR_ATTENTION)
        n_full = self.num_hidden_layers - n_linear
        return emb + n_full * attn + n_linear * linear + mlps + norms + h

    def num_active_parameters(self) -> int:
        """Parameters one token passes through: like num_parameters, with top-k of the experts."""
        if not self.num_experts:
            return self.num_parameters()
        idle = self.num_experts - self.num_experts_per_tok
        sparse_layers = sum(self.is_sparse_layer(n) for n in range(self.num_hidden_layers))
        return self.num_parameters() - sparse_layers * idle * 3 * self.hidden_size * self.moe_intermediate_size


# Shapes of the published checkpoints (vocab rows, not tokenizer length) and a tiny test shape.
PRESETS: dict[str, dict] = {
    "tiny": dict(
        vocab_size=151936, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        max_position_embeddings=4096,
    ),
    "0.5b": dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
    ),
    "1.5b": dict(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True,
    ),
    "3b": dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
        num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True,
    ),
    "7b": dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False,
    ),
    "qwen3-0.6b": dict(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
        attention_bias=False, qk_norm=True, model_type="qwen3", eos_token_id=151645,
    ),
    "qwen3-8b": dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
        attention_bias=False, qk_norm=True, model_type="qwen3", eos_token_id=151645,
    ),
    # Qwen3-30B-A3B (config.json of the published checkpoint): 30.5B parameters, 3.3B active.
    "qwen3-30b-a3b": dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, tie_word_embeddings=False,
        attention_bias=False, qk_norm=True, model_type="qwen3_moe", eos_token_id=151645,
        max_position_embeddings=40960, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
        norm_topk_prob=True,
    ),
}


# ---------------------------------------------------------------------- config.json helpers
# config.json keys that are sizes or counts (integers in [0, MAX_INT]), token ids (such an integer
# or a list of them) and real numbers (finite): checked before any is used, so `Infinity`, NaN,
# true, 2.5 or 10**30 is named with its key instead of failing in int() or an allocation.
MAX_INT = 2**31 - 1
INT_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "original_max_position_embeddings",
    "num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step",
    "shared_expert_intermediate_size", "full_attention_interval", "linear_conv_kernel_dim", "linear_key_head_dim",
    "linear_value_head_dim", "linear_num_key_heads", "linear_num_value_heads", "kv_channels", "seq_length",
)
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
REAL_KEYS = ("rope_theta", "rms_norm_eps", "layer_norm_epsilon", "rotary_emb_base", "partial_rotary_factor",
             "router_aux_loss_coef")


def check_numbers(raw: dict, source: str) -> None:
    """Every numeric key of a config.json dict (and of its text_config) has a usable type and range."""
    for where, d in ((source, raw), (f"{source} (text_config)", raw.get("text_config"))):
        if not isinstance(d, dict):
            continue
        for key in INT_KEYS + TOKEN_ID_KEYS + REAL_KEYS:
            value = d.get(key)
            if value is None:
                continue
            if key in REAL_KEYS:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                want = "a finite number"
            else:
                items = value if key == "eos_token_id" and isinstance(value, list) and value else [value]
                ok = all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_INT for v in items)
                want = f"an integer in [0, {MAX_INT}]" + (" or a list of them" if key == "eos_token_id" else "")
            if not ok:
                raise ConfigError(f"{where}: {key} = {json.dumps(value)[:60]}: expected {want}")


def _rope_from_hf(raw: dict, source: str) -> tuple[float, Optional[dict]]:
    """(rope_theta, rope_scaling) as transformers v5 reads them (RotaryEmbeddingConfigMixin).

    A legacy `rope_scaling` dict (with `type` or `rope_type`) replaces `rope_parameters`; a
    rope_theta inside the dict wins over the top-level one (default 10000); yarn and llama3
    default `original_max_position_embeddings` to max_position_embeddings.
    """
    legacy = raw.get("rope_scaling")
    if not all(isinstance(v, (dict, type(None))) for v in (legacy, raw.get("rope_parameters"))):
        raise ConfigError(f"{source}: rope_scaling / rope_parameters must be JSON objects or null")
    params = dict(legacy or raw.get("rope_parameters") or {})  # `or`: an empty rope_scaling counts as absent
    theta = params.pop("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.pop("rope_type", None) or params.get("type") or "default"
    params.pop("type", None)
    partial = params.pop("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ConfigError(f"{source}: partial_rotary_factor {partial!r} is not supported (Qwen2/Qwen3 rotate the whole head)")
    if rope_type == "default":
        return float(theta), None
    if rope_type in ("yarn", "llama3"):
        if "original_max_position_embeddings" in raw:  # Phi-3 style top-level key: transformers prefers it
            params["original_max_position_embeddings"] = raw["original_max_position_embeddings"]
        params.setdefault("original_max_position_embeddings", raw.get("max_position_embeddings", 32768))
    scaling = {"rope_type": rope_type, **params}
    problem = check_rope_scaling(scaling)
    if problem:
        raise ConfigError(f"{source}: {problem}")
    return float(theta), scaling


def _qwen35_moe_from_hf(text: dict, source: str) -> dict:
    """The MoE fields of a Qwen3.5-MoE text config (Qwen3_5MoeTextConfig's defaults for absent keys)."""
    out = {k: text.get(k, default) for k, default in QWEN35_MOE_DEFAULTS.items()}
    for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size"):
        if isinstance(out[key], bool) or not isinstance(out[key], int):
            raise ConfigError(f"{source}: {key} must be an integer, got {out[key]!r}")
    out["output_router_logits"] = bool(out["output_router_logits"])
    out["router_aux_loss_coef"] = float(out["router_aux_loss_coef"])
    return out


def _moe_from_hf(raw: dict, source: str) -> dict:
    """The Qwen3-MoE fields of a config.json (num_experts or its alias num_local_experts)."""
    num_experts = raw.get("num_experts", raw.get("num_local_experts"))
    if num_experts is None:
        raise ConfigError(f"{source}: model_type 'qwen3_moe' needs 'num_experts' (or 'num_local_experts')")
    out = {k: raw.get(k, default) for k, default in MOE_DEFAULTS.items()}
    out["num_experts"] = num_experts
    out["mlp_only_layers"] = list(raw.get("mlp_only_layers") or [])
    for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step"):
        if isinstance(out[key], bool) or not isinstance(out[key], int):
            raise ConfigError(f"{source}: {key} must be an integer, got {out[key]!r}")
    return out
