"""QwenConfig from HF config.json files (values compared with transformers' own parsing)."""

import json

import pytest

from models.qwen import ConfigError, QwenConfig
from tests.helpers import hf_config


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_from_hf_reads_what_transformers_wrote(tmp_path, kind):
    ref = hf_config(kind, tie_word_embeddings=True)
    ref.save_pretrained(tmp_path)
    cfg = QwenConfig.from_hf(tmp_path)
    assert cfg.model_type == kind
    assert cfg.head_dim == getattr(ref, "head_dim", ref.hidden_size // ref.num_attention_heads)
    assert cfg.num_key_value_heads == ref.num_key_value_heads
    assert cfg.rope_theta == ref.rope_parameters["rope_theta"]
    assert cfg.tie_word_embeddings is True
    assert cfg.qk_norm == (kind == "qwen3")
    assert cfg.attention_bias == (kind == "qwen2")


def test_to_hf_round_trips_through_transformers(tmp_path):
    from transformers import AutoConfig

    cfg = QwenConfig.preset("qwen3-0.6b")
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf()))
    hf = AutoConfig.from_pretrained(tmp_path)
    assert hf.model_type == "qwen3" and hf.head_dim == 128 and hf.num_key_value_heads == 8
    assert QwenConfig.from_hf(tmp_path).to_hf() == cfg.to_hf()


def test_presets_have_published_parameter_counts():
    # Qwen2.5-0.5B: 494M, 1.5B: 1.54B, 7B: 7.62B parameters (model cards).
    assert abs(QwenConfig.preset("0.5b").num_parameters() / 1e6 - 494) < 1
    assert abs(QwenConfig.preset("1.5b").num_parameters() / 1e9 - 1.54) < 0.01
    assert abs(QwenConfig.preset("qwen2.5-7b").num_parameters() / 1e9 - 7.62) < 0.01


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset"):
        QwenConfig.preset("13b")
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(ConfigError, match=r"config\.json:1: malformed JSON"):
        QwenConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "rope_scaling": {"type": "yarn"},
                                                      "vocab_size": 1, "hidden_size": 8, "intermediate_size": 8,
                                                      "num_hidden_layers": 1, "num_attention_heads": 2}))
    with pytest.raises(ConfigError, match="yarn"):
        QwenConfig.from_hf(tmp_path)
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        QwenConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=3)


@pytest.mark.parametrize("key", ["vocab_size", "num_hidden_layers", "eos_token_id", "rms_norm_eps", "num_experts"])
@pytest.mark.parametrize("value", ["Infinity", "-Infinity", "NaN", "-1", "2.5", "true", "1e400", str(10**30), '"12"'])
def test_numbers_no_model_has_are_named_with_their_key(key, value, tmp_path):
    real = key == "rms_norm_eps"
    if real and value in ("-1", "true", '"12"'):
        value = "true" if value == "-1" else value   # a negative eps is caught by its own range check
    raw = {"model_type": "qwen2", "vocab_size": 64, "hidden_size": 8, "intermediate_size": 8,
           "num_hidden_layers": 1, "num_attention_heads": 2}
    text = json.dumps(raw)[:-1] + f', "{key}": {value}' + "}"
    (tmp_path / "config.json").write_text(text.replace(f'"{key}": {raw[key]}, ', "") if key in raw else text)
    if real and value in ("2.5", str(10**30)):   # finite reals are fine for eps
        QwenConfig.from_hf(tmp_path)
        return
    with pytest.raises(ConfigError, match=rf"config\.json: {key} = .*: expected (an integer|a finite number)"):
        QwenConfig.from_hf(tmp_path)
