"""QwenConfig: the shape of a Qwen decoder, read from (and written to) an HF `config.json`.

One config describes every supported family; what differs by family (parsing config.json and
writing it back, validation rules, checkpoint names, blocks, GGUF architecture) lives in that
family's module under models/qwen/families/ (`QwenConfig.family`). This module keeps the fields,
the checks every family shares, the presets and the config.json helpers the families use.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch

from .errors import ConfigError  # noqa: F401  (re-exported)
from .rope import check_rope_scaling
from fileio.safe_load import read_json
from .special_tokens import ENDOFTEXT_ID

if TYPE_CHECKING:
    from .families import Family

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
# Qwen3MoeConfig's defaults in transformers (used for keys a qwen3_moe config.json leaves out).
MOE_DEFAULTS = dict(num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=False,
                    decoder_sparse_step=1, output_router_logits=False, router_aux_loss_coef=0.001)


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
    model_type: str = "qwen2"  # a family's model_type (models/qwen/families; v1 checkpoints load as qwen2)
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
        from .families import FAMILIES, family_of_config, written_model_types

        family = family_of_config(self.model_type, self.source_format)
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, key)
            if key == "intermediate_size" and value == 0 and family is not None and family.allows_zero_intermediate_size():
                continue  # e.g. every Qwen3.5-MoE layer is sparse: there is no dense MLP
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{key} = {value!r}: expected a positive integer")
        if self.head_dim is not None and (not isinstance(self.head_dim, int) or self.head_dim <= 0 or self.head_dim % 2):
            raise ConfigError(f"head_dim = {self.head_dim!r}: expected a positive even integer (rotary halves)")
        if not self.rms_norm_eps > 0 or not self.rope_theta > 0:
            raise ConfigError(f"rms_norm_eps = {self.rms_norm_eps!r}, rope_theta = {self.rope_theta!r}: expected numbers > 0")
        if self.attention_bias is None:
            self.attention_bias = family.default_attention_bias if family is not None else True
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
        if family is None and self.model_type in written_model_types():
            formats = sorted({f for fam in FAMILIES.values() if fam.model_type == self.model_type
                              for f in fam.source_formats})
            raise ConfigError(f"source_format {self.source_format!r}: model_type {self.model_type!r} expects one of "
                              f"{formats}")
        if family is None:
            raise ConfigError(f"model_type {self.model_type!r}: expected one of {written_model_types()}")
        family.validate(self)
        problem = check_rope_scaling(self.rope_scaling)
        if problem:
            raise ConfigError(problem)
        family.validate_moe(self)
        self._check_moe()

    def _check_moe(self) -> None:
        """The MoE fields are in range (a dense config: num_experts 0, nothing else checked; what
        the family requires: Family.validate_moe)."""
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
            from .families import family_of

            return family_of(raw, source).from_hf(raw, source)
        except ConfigError as e:
            raise ConfigError(str(e) if str(e).startswith(source) else f"{source}: {e}") from None
        except (TypeError, ValueError) as e:   # int("abc"), float(None): a value of the wrong kind
            raise ConfigError(f"{source}: a value has the wrong type ({e})") from None

    def to_hf(self) -> dict:
        """The config.json dict that transformers' class for this family (`family.architecture`) loads."""
        return self.family.to_hf(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ sizes
    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def family(self) -> "Family":
        """The model family this config describes (models/qwen/families): what differs by family."""
        from .families import family_of_config

        return family_of_config(self.model_type, self.source_format)

    # ---- the hybrid layer stack (Qwen3.5, Qwen3-Next); every other family is all full attention
    @property
    def is_qwen35(self) -> bool:
        """Qwen3.5's hybrid stack (`family.hybrid`): zero-centred norms, gated full attention,
        Gated DeltaNet layers."""
        return self.family.hybrid

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
        hybrid = self.family.hybrid
        gate = 2 if hybrid else 1  # Qwen3.5's q_proj also yields the output gate
        attn = gate * h * self.q_size + 2 * h * self.kv_size + self.q_size * h
        if self.attention_bias:
            o_bias = self.family.o_proj_bias
            attn += gate * self.q_size + 2 * self.kv_size + (h if o_bias else 0)
        if self.qk_norm:
            attn += 2 * d
        sparse = self.num_experts * (3 * h * self.moe_intermediate_size + h)  # experts + router row
        if self.shared_expert_intermediate_size:  # Qwen3.5-MoE: shared expert + its gate row
            sparse += 3 * h * self.shared_expert_intermediate_size + h
        mlps = sum(sparse if self.is_sparse_layer(n) else 3 * h * i for n in range(self.num_hidden_layers))
        norms = 2 * h * self.num_hidden_layers
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        if not hybrid:
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
