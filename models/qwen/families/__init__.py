"""One module per Qwen model family: the one place that says what a family is.

    qwen2.py       Qwen2ForCausalLM (Qwen2, Qwen2.5)
    qwen3.py       Qwen3ForCausalLM
    qwen3_moe.py   Qwen3MoeForCausalLM (Qwen3-30B-A3B, Qwen3-235B-A22B)
    qwen3_5.py     Qwen3_5ForCausalLM / Qwen3_5MoeForCausalLM, and the text model of a
                   Qwen3_5[Moe]ForConditionalGeneration checkpoint (config.json `text_config`)
    qwen3_next.py  Qwen3NextForCausalLM (Qwen3-Next-80B-A3B, Qwen3-Coder-Next)
    v1.py          QWenLMHeadModel (Qwen-7B v1, remote code), loaded onto the Qwen2 names

A `Family` owns everything that differs by family: parsing config.json into a QwenConfig and
writing it back (`from_hf` / `to_hf`) with its validation rules (`validate`), the checkpoint
key mapping and which tensors are skipped (`skip_unread`, `checkpoint_pairs`), the blocks it
builds (`norm_class`, `attention_class`, `linear_attention_class`, `o_proj_bias`), the linears
kept 16-bit and never adapted by "all-linear" (`keeps_16bit`, read by checkpoint, quant and lora),
what PEFT does with its adapters, and its GGUF architecture name (or why it has none).

`family_of(raw_config_json, source)` picks the family that reads a config.json dict;
`QwenConfig.family` (`family_of_config`) the one a parsed config belongs to. Code outside this
package asks the family object; it never compares `model_type` itself.

Adding a family means adding one file here (a `Family` subclass instance passed to `register`,
imported at the bottom of this module) plus its tests (tests/models/test_families.py checks
that every registered family round-trips its own config.json).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

from torch import nn

from ..errors import ConfigError

if TYPE_CHECKING:  # (config.py imports this package lazily: QwenConfig is only a type here)
    from pathlib import Path

    import torch

    from ..config import QwenConfig

# The one-row linear whose sigmoid scales a shared expert (moe.SharedExpertGate): kept 16-bit by a
# 4-bit load and by quant.quantize_model, and no "all-linear" LoRA target (a rank-r adapter on a
# [1, hidden] weight has more parameters than the weight). Declared here once; see keeps_16bit.
SHARED_EXPERT_GATE = "shared_expert_gate"


class Family:
    """What one Qwen family is. Subclasses set the class attributes and override the methods.

    name: registry key. model_type: what QwenConfig.model_type holds and config.json writes.
    reads: the config.json model_types this family parses (default: (model_type,)).
    source_formats: the QwenConfig.source_format values it loads from ("hf": the HF names).
    architecture: the transformers class config.json names. hybrid: Qwen3.5's layer stack
    (Gated DeltaNet + gated full attention, zero-centred norms). moe: needs num_experts > 0.
    shared_expert: every sparse layer has a gated shared expert. gguf_architecture: llama.cpp's
    name (None: `gguf_refusal` says why there is none).
    """

    name: str = ""
    model_type: str = ""
    reads: tuple[str, ...] = ()
    source_formats: tuple[str, ...] = ("hf",)
    architecture: str = ""
    hybrid: bool = False
    moe: bool = False
    shared_expert: bool = False
    default_attention_bias: bool = True  # attention_bias when a QwenConfig is built without one
    o_proj_bias: bool = True  # o_proj has a bias when attention_bias does (Qwen2: q/k/v only)
    # PEFT (lora/peft_io.py, lora/fused_experts.py): routed-expert adapters written in PEFT's fused
    # layout; shared-expert / dense-MLP adapters written as target_parameters; PEFT converts
    # expert adapters onto fused experts with gate_up_proj's alpha doubled (facts about PEFT's
    # handling of this family's checkpoint, read by lora/; models/qwen holds no adapter code).
    peft_fused_experts: bool = False
    peft_parameter_targets: bool = False
    peft_doubles_expert_alpha: bool = False
    gguf_architecture: Optional[str] = None
    gguf_refusal: str = ""
    # transformers' sequence-classification class of the family (score head on the last non-pad
    # token: models/qwen/score.py); None where transformers has none.
    sequence_classification: Optional[str] = None

    def __repr__(self) -> str:
        return f"<family {self.name}>"

    # ------------------------------------------------------------------ config.json
    def reader_architecture(self, model_type: str) -> str:
        """The transformers class of a config.json with this model_type (one of `reads`)."""
        return self.architecture

    def claims(self, architectures: list) -> bool:
        """Whether config.json's `architectures` make it this family whatever its model_type."""
        return False

    def from_hf(self, raw: dict, source: str) -> "QwenConfig":
        """A config.json dict (already number-checked) -> QwenConfig; `source` names the file."""
        raise NotImplementedError

    def to_hf(self, cfg: "QwenConfig") -> dict:
        """The config.json dict that transformers' `architecture` class loads."""
        raise NotImplementedError

    def validate(self, cfg: "QwenConfig") -> None:
        """The family's rules on a QwenConfig (called from QwenConfig.__post_init__); may fill
        family defaults (e.g. Qwen3.5's layer_types)."""

    def allows_zero_intermediate_size(self) -> bool:
        """Whether intermediate_size may be 0 (a family with no dense MLP in any layer)."""
        return False

    # ------------------------------------------------------------------ checkpoint names
    def skip_unread(self, cfg: "QwenConfig") -> Optional[Callable[[str], bool]]:
        """A predicate on checkpoint keys whose tensors `load` never reads (None: read all)."""
        return None

    def checkpoint_pairs(self, key: str, tensor: "torch.Tensor", cfg: "QwenConfig",
                         file: "Path") -> Optional[list[tuple[str, "torch.Tensor"]]]:
        """A checkpoint tensor -> [(our parameter name, tensor)], or None for a tensor outside
        the model we build (kept on disk, written back by `save`: models/qwen/whole.py). Names
        that are no parameter pass through, for the loader to report."""
        from ..moe import map_fused_experts

        return map_fused_experts(key, tensor, cfg, file) if cfg.num_experts else [(key, tensor)]

    def nested(self, cfg: "QwenConfig") -> bool:
        """Whether the text model sits under model.language_model. (a vision-language checkpoint
        whose config.json holds it as `text_config`)."""
        return False

    def text_config(self, raw: dict, cfg: "QwenConfig") -> dict:
        """The config.json dict the text model `cfg` was parsed from (raw, or its text_config)."""
        return raw["text_config"] if self.nested(cfg) else raw

    # ------------------------------------------------------------------ blocks
    def norm_class(self) -> type[nn.Module]:
        """The block and final norms."""
        from ..layers import RMSNorm

        return RMSNorm

    def attention_class(self) -> type[nn.Module]:
        """The softmax attention of a full-attention layer."""
        from ..attention import Attention

        return Attention

    def linear_attention_class(self) -> Optional[type[nn.Module]]:
        """The token mixer of a "linear_attention" layer (None: the family has none)."""
        return None

    def frozen_linears(self) -> tuple[str, ...]:
        """Leaf names of the linears kept 16-bit (no 4-bit) and left out of "all-linear" LoRA."""
        return (SHARED_EXPERT_GATE,) if self.shared_expert else ()

    def keeps_16bit(self, module_name: str) -> bool:
        """Whether the linear at `module_name` (dotted path) is one of `frozen_linears`."""
        return module_name.rsplit(".", 1)[-1] in self.frozen_linears()


    def validate_moe(self, cfg: "QwenConfig") -> None:
        """num_experts / shared_expert_intermediate_size agree with the family (the ranges of
        the MoE fields are QwenConfig's own checks)."""
        if self.moe and cfg.num_experts <= 0:
            raise ConfigError(f"model_type {cfg.model_type!r} needs num_experts > 0, got {cfg.num_experts}")
        if cfg.num_experts and not self.moe:
            moe_types = _one_of(f.model_type for f in FAMILIES.values() if f.moe)
            raise ConfigError(f"num_experts {cfg.num_experts} needs model_type {moe_types}, got {cfg.model_type!r}")
        shared = cfg.shared_expert_intermediate_size
        if self.shared_expert and (isinstance(shared, bool) or not isinstance(shared, int) or shared <= 0):
            raise ConfigError(f"shared_expert_intermediate_size = {shared!r}: model_type {cfg.model_type!r} "
                              "needs a positive integer (its MoE block always has a shared expert)")
        if shared and not self.shared_expert:
            shared_types = _one_of(f.model_type for f in FAMILIES.values() if f.shared_expert)
            raise ConfigError(f"shared_expert_intermediate_size {shared} needs model_type {shared_types}, "
                              f"got {cfg.model_type!r}")


def _one_of(names) -> str:
    """'a', 'b' or 'c'."""
    quoted = [repr(n) for n in dict.fromkeys(names)]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def common_hf(cfg: "QwenConfig") -> dict:
    """The config.json keys every family writes (unknown keys read from disk kept under them)."""
    out = dict(cfg.extra)
    out.update(
        architectures=[cfg.family.architecture],
        model_type=cfg.model_type,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        attention_bias=cfg.attention_bias,
        attention_dropout=0.0,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
        dtype=cfg.torch_dtype,
        use_cache=True,
    )
    return out


def check_architectures(raw: dict, source: str, allowed: str, model_type: Optional[str] = None) -> None:
    """Every entry of config.json's `architectures` is `allowed` (the family's class) or that
    family's sequence-classification class."""
    classifiers = {f.architecture: f.sequence_classification for f in FAMILIES.values() if f.sequence_classification}
    for arch in raw.get("architectures") or []:
        if arch != allowed and arch != classifiers.get(allowed):
            where = f" for model_type {model_type!r}" if model_type else ""
            raise ConfigError(f"{source}: architecture {arch!r} is not supported{where} (expected {allowed!r})")


def need(raw: dict, source: str, key: str, what: str = "") -> Any:
    """raw[key], or a one-line ConfigError naming the file and the key."""
    if key not in raw:
        raise ConfigError(f"{source}: missing required key {key!r}{what}")
    return raw[key]


# ---------------------------------------------------------------------- the registry
FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add a family (each family module registers its instance(s) on import)."""
    if not family.reads:
        family.reads = (family.model_type,)
    FAMILIES[family.name] = family
    return family


def supported_model_types() -> str:
    """"'qwen2' (Qwen2ForCausalLM), ..." : every config.json model_type a family reads."""
    return ", ".join(f"{t!r} ({f.reader_architecture(t)})" for f in FAMILIES.values() for t in f.reads)


def family_of(raw: dict, source: str = "config.json") -> Family:
    """The family that reads config.json dict `raw` (by model_type, or QWenLMHeadModel in
    architectures); a one-line ConfigError naming `source` and the supported ones otherwise."""
    model_type = raw.get("model_type")
    archs = raw.get("architectures") or []
    for family in FAMILIES.values():
        if family.claims(archs):
            return family
    for family in FAMILIES.values():
        if model_type in family.reads:
            return family
    raise ConfigError(f"{source}: model_type {model_type!r} is not supported: expected {supported_model_types()}")


def family_of_config(model_type: str, source_format: str) -> Optional[Family]:
    """The family of a QwenConfig with this model_type and source_format (None: no family)."""
    for family in FAMILIES.values():
        if family.model_type == model_type and source_format in family.source_formats:
            return family
    return None


def written_model_types() -> tuple[str, ...]:
    """The model_types a QwenConfig may hold (each family's own, written to config.json)."""
    return tuple(dict.fromkeys(f.model_type for f in FAMILIES.values()))


def model_family(model: Any) -> Optional[Family]:
    """The family of `model.config` (None for a module without a QwenConfig)."""
    config = getattr(model, "config", None)
    return getattr(config, "family", None)


def keeps_16bit(model: Any, module_name: str) -> bool:
    """Whether `model`'s linear at `module_name` stays 16-bit and out of "all-linear" LoRA
    (Family.frozen_linears of the model's family; False for a model without one)."""
    family = model_family(model)
    return family is not None and family.keeps_16bit(module_name)


from . import qwen2, qwen3, qwen3_moe, qwen3_5, qwen3_next, v1  # noqa: E402,F401  (they register)
