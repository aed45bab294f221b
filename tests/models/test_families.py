"""The family registry (models/qwen/families): each family reads its own config.json and writes
it back to the same config, an unknown model_type is refused in one line, and no code outside
the families package decides by comparing model_type (or source_format) to a string."""

import ast
import json
from pathlib import Path

import pytest

from models.qwen import ConfigError, QwenConfig
from models.qwen.families import FAMILIES, family_of

ROOT = Path(__file__).resolve().parents[2]

_COMMON = dict(vocab_size=320, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=2048, rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=[151645, 151643],
               tie_word_embeddings=False, torch_dtype="bfloat16")
_HYBRID = dict(head_dim=16, layer_types=["linear_attention", "full_attention"] * 2, linear_conv_kernel_dim=4,
               linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4)
_QWEN35_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=32)

# A config.json of each family, in the form its published checkpoints have (tiny shapes).
CONFIG_JSON = {
    "qwen2": [dict(_COMMON, architectures=["Qwen2ForCausalLM"], model_type="qwen2", intermediate_size=160,
                   rope_theta=1_000_000.0, use_sliding_window=False, sliding_window=131072, max_window_layers=21)],
    "qwen3": [dict(_COMMON, architectures=["Qwen3ForCausalLM"], model_type="qwen3", intermediate_size=160,
                   head_dim=32, attention_bias=False, use_sliding_window=False, sliding_window=None, max_window_layers=2,
                   rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512})],
    "qwen3_moe": [dict(_COMMON, architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", intermediate_size=160,
                       head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                       norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1])],
    "qwen3_5_text": [
        dict(_COMMON, **_HYBRID, architectures=["Qwen3_5ForCausalLM"], model_type="qwen3_5_text",
             intermediate_size=160, rope_parameters={"rope_type": "default", "rope_theta": 1e7,
                                                     "partial_rotary_factor": 0.25}),
        # the vision-language checkpoint: the text model is its text_config
        dict(architectures=["Qwen3_5ForConditionalGeneration"], model_type="qwen3_5", tie_word_embeddings=True,
             vision_config={"depth": 2}, text_config=dict(_COMMON, **_HYBRID, model_type="qwen3_5_text",
                                                          intermediate_size=160)),
    ],
    "qwen3_5_moe_text": [
        dict(_COMMON, **_HYBRID, **_QWEN35_MOE, architectures=["Qwen3_5MoeForCausalLM"], model_type="qwen3_5_moe_text"),
        dict(architectures=["Qwen3_5MoeForConditionalGeneration"], model_type="qwen3_5_moe",
             text_config=dict(_COMMON, **_HYBRID, **_QWEN35_MOE, model_type="qwen3_5_moe_text")),
    ],
    "qwen3_next": [dict(_COMMON, **_HYBRID, **_QWEN35_MOE, architectures=["Qwen3NextForCausalLM"],
                        model_type="qwen3_next", intermediate_size=96, decoder_sparse_step=1, mlp_only_layers=[0],
                        norm_topk_prob=True, partial_rotary_factor=0.25, rope_theta=1e7)],
    "v1": [dict(architectures=["QWenLMHeadModel"], model_type="qwen", vocab_size=320, hidden_size=64,
                intermediate_size=320, num_hidden_layers=2, num_attention_heads=4, kv_channels=16,
                rotary_emb_base=10000, layer_norm_epsilon=1e-6, seq_length=2048, bf16=True)],
}


def test_every_family_has_a_config_json_here():
    assert sorted(CONFIG_JSON) == sorted(FAMILIES)


@pytest.mark.parametrize("name,raw", [(n, r) for n, raws in CONFIG_JSON.items() for r in raws],
                         ids=lambda v: v if isinstance(v, str) else v["model_type"])
def test_family_round_trips_its_config_json(name, raw, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(raw))
    family = FAMILIES[name]
    assert family_of(raw) is family
    parsed = QwenConfig.from_hf(tmp_path)
    assert parsed.family is family
    written = parsed.to_hf()
    assert written["architectures"] == [family.architecture]
    again = QwenConfig.from_hf(written)
    # Every field comes back; `extra` (config.json keys the family does not read, written back as
    # they were) also gains the keys to_hf writes for transformers alone (hidden_act, use_cache ...).
    fields, fields_again = parsed.to_dict(), again.to_dict()
    extra, extra_again = fields.pop("extra"), fields_again.pop("extra")
    assert extra.items() <= extra_again.items()
    assert set(extra_again) - set(extra) <= set(written)
    if family.source_formats == ("hf",):
        assert fields_again == fields
    else:
        # v1 is written as the Qwen2 checkpoint it loads as; a vision-language checkpoint's text
        # model as a text-only one (`save` writes the whole checkpoint: models/qwen/whole.py)
        assert fields_again | {"source_format": parsed.source_format} == fields
        assert again.family.model_type == family.model_type
    assert again.to_hf() == written


def test_unknown_model_type_is_refused_in_one_line(tmp_path):
    file = tmp_path / "config.json"
    file.write_text(json.dumps(dict(CONFIG_JSON["qwen2"][0], model_type="llama", architectures=["LlamaForCausalLM"])))
    with pytest.raises(ConfigError) as info:
        QwenConfig.from_hf(tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{file}: model_type 'llama' is not supported")
    for family in FAMILIES.values():
        for model_type in family.reads:
            assert repr(model_type) in message


# ---------------------------------------------------------------------- no family branches elsewhere
PACKAGES = ("models", "quant", "lora", "data", "train", "cli", "demo", "examples")
EXEMPT = (ROOT / "models" / "qwen" / "families", ROOT / "data" / "vocab" / "mine.py")  # mine.py: sentencepiece's model_type
FAMILY_FIELDS = ("model_type", "source_format")


def _names_family_field(node: ast.AST) -> bool:
    """x.model_type, model_type, getattr(x, "model_type", ...)."""
    if isinstance(node, ast.Attribute):
        return node.attr in FAMILY_FIELDS
    if isinstance(node, ast.Name):
        return node.id in FAMILY_FIELDS
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr":
        return len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and node.args[1].value in FAMILY_FIELDS
    return False


def _is_string_literal(node: ast.AST) -> bool:
    """"qwen2", or a tuple / list / set of string literals."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return bool(node.elts) and all(_is_string_literal(e) for e in node.elts)
    return False


def family_comparisons(tree: ast.AST) -> list[int]:
    """Lines where model_type / source_format is compared (==, !=, in, not in) with string literals."""
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        for left, right in zip(operands, operands[1:]):
            if (_names_family_field(left) and _is_string_literal(right)) or (
                    _names_family_field(right) and _is_string_literal(left)):
                lines.append(node.lineno)
    return sorted(lines)


def test_the_checker_finds_a_family_branch():
    tree = ast.parse('if cfg.model_type == "qwen2" or getattr(m, "model_type", None) in ("a", "b"):\n'
                     '    pass\nif "qwen-v1" != config.source_format:\n    pass\nif cfg.model_type == other:\n    pass\n')
    assert family_comparisons(tree) == [1, 1, 3]


def test_no_module_outside_the_families_compares_model_type_to_a_literal():
    found = []
    for package in PACKAGES:
        for file in sorted((ROOT / package).rglob("*.py")):
            if any(file == e or e in file.parents for e in EXEMPT):
                continue
            for line in family_comparisons(ast.parse(file.read_text(encoding="utf-8"))):
                found.append(f"{file.relative_to(ROOT)}:{line}")
    assert not found, f"family decided outside models/qwen/families (ask config.family): {found}"
