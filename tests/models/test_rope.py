"""Scaled RoPE (YaRN, linear, llama3) against transformers: the tables, the config parsing, and
logits / greedy generation of tiny Qwen2, Qwen3 and Qwen3-MoE models at positions beyond
`original_max_position_embeddings` (and beyond `max_position_embeddings`)."""

import json

import pytest
import torch

from models.qwen import ConfigError, QwenConfig, generate, load, save
from models.qwen.rope import RotaryEmbedding
from tests.helpers import assert_logits_match, hf_config, hf_model, random_ids, save_hf_model

ORIGINAL = 32  # the tiny models' "pretraining" context; they allow max_position_embeddings=256

# rope_parameters as a config.json carries them (rope_theta added by the config).
SCALINGS = {
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
    "yarn-untruncated": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": ORIGINAL,
                         "truncate": False, "beta_fast": 16, "beta_slow": 2},
    "yarn-mscale": {"rope_type": "yarn", "factor": 5.0, "original_max_position_embeddings": ORIGINAL,
                    "mscale": 0.9, "mscale_all_dim": 0.6},
    "yarn-attention-factor": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": ORIGINAL,
                              "attention_factor": 1.25},
    "linear": {"rope_type": "linear", "factor": 3.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": ORIGINAL,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0},
}


@pytest.mark.parametrize("name", sorted(SCALINGS))
@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "qwen3_moe"])
def test_tables_match_transformers_through_config_json(tmp_path, kind, name):
    """transformers writes the config; we read it back; inv_freq and the cos/sin factor agree."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    ref = hf_config(kind, rope_parameters={**SCALINGS[name], "rope_theta": 10000.0})
    ref.save_pretrained(tmp_path)
    cfg = QwenConfig.from_hf(tmp_path)
    want_inv_freq, want_factor = ROPE_INIT_FUNCTIONS[SCALINGS[name]["rope_type"]](ref, device=None)
    rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    assert torch.equal(rope.inv_freq, want_inv_freq)
    assert rope.attention_factor == pytest.approx(want_factor, rel=1e-12)
    if name == "yarn":
        assert rope.attention_factor == pytest.approx(0.1 * torch.log(torch.tensor(4.0)).item() + 1)


def test_legacy_rope_scaling_of_the_model_cards(tmp_path):
    """Qwen2.5's card: add {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    next to the top-level rope_theta; transformers merges them into rope_parameters, and so do we."""
    from transformers import AutoConfig

    raw = hf_config("qwen2").to_dict()
    raw.pop("rope_parameters", None)
    raw.update(rope_theta=5000.0, max_position_embeddings=131072,
               rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})
    (tmp_path / "config.json").write_text(json.dumps(raw))
    ref = AutoConfig.from_pretrained(tmp_path)
    cfg = QwenConfig.from_hf(tmp_path)
    assert cfg.rope_theta == ref.rope_parameters["rope_theta"] == 5000.0
    assert {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768} == cfg.rope_scaling
    assert cfg.rope_scaling.items() <= ref.rope_parameters.items()
    # no original_max_position_embeddings: transformers takes max_position_embeddings
    raw["rope_scaling"] = {"rope_type": "yarn", "factor": 2.0}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    ref = AutoConfig.from_pretrained(tmp_path)
    assert QwenConfig.from_hf(tmp_path).rope_scaling["original_max_position_embeddings"] == \
        ref.rope_parameters["original_max_position_embeddings"] == 131072


@pytest.fixture(params=["qwen2", "qwen3", "qwen3_moe"])
def yarn_pair(request, tmp_path):
    """(transformers model, our model) of one family with YaRN over an original context of 32."""
    ref = hf_model(request.param, rope_parameters={**SCALINGS["yarn"], "rope_theta": 10000.0})
    save_hf_model(ref, tmp_path / "ckpt")
    return ref, load(tmp_path / "ckpt", dtype=torch.float32)


def test_yarn_logits_beyond_the_original_context(yarn_pair):
    ref, ours = yarn_pair
    assert ours.config.rope_scaling["rope_type"] == "yarn"
    ids = random_ids(2, 3 * ORIGINAL + 5)  # positions 0 .. 100: three original contexts
    with torch.no_grad():
        assert_logits_match(ours(ids), ref, ids)
        # and past max_position_embeddings (256): YaRN is static, any position has its rotation
        pos = torch.arange(240, 240 + 40).expand(2, 40)
        short = ids[:, :40]
        assert_logits_match(ours(short, position_ids=pos), ref, short, position_ids=pos)


def test_yarn_greedy_generation_equals_transformers(yarn_pair):
    """A prompt longer than the original context, continued with the KV cache on both sides."""
    ref, ours = yarn_pair
    prompt = random_ids(1, ORIGINAL + 9, seed=5)
    want = ref.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = generate(ours, prompt, max_new_tokens=12, temperature=0.0, eos_ids=[])
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", ["yarn", "linear", "llama3"])
def test_saved_config_reloads_the_same_model_in_transformers(tmp_path, name):
    from transformers import AutoModelForCausalLM

    ref = hf_model("qwen3", rope_parameters={**SCALINGS[name], "rope_theta": 10000.0})
    save_hf_model(ref, tmp_path / "hf")
    ours = load(tmp_path / "hf", dtype=torch.float32)
    save(ours, tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["rope_scaling"] == SCALINGS[name]  # the legacy key too: vLLM, llama.cpp's converter
    assert written["rope_parameters"] == {**SCALINGS[name], "rope_theta": 10000.0}
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    assert back.config.rope_parameters == ref.config.rope_parameters
    ids = random_ids(1, 3 * ORIGINAL)
    with torch.no_grad():
        assert_logits_match(back(ids).logits, ref, ids)
    assert QwenConfig.from_hf(tmp_path / "ours").to_hf() == ours.config.to_hf()


def test_unsupported_rope_types_are_clear_errors(tmp_path):
    raw = hf_config("qwen2").to_dict()
    cases = {
        "dynamic": ({"rope_type": "dynamic", "factor": 2.0}, "'dynamic' is not supported"),
        "longrope": ({"rope_type": "longrope", "short_factor": [1.0] * 6, "long_factor": [2.0] * 6,
                      "original_max_position_embeddings": 32}, "'longrope' is not supported"),
        "no factor": ({"type": "yarn"}, "'yarn' needs 'factor'"),
        "bad factor": ({"rope_type": "linear", "factor": 0.5}, "factor must be >= 1"),
        "unknown key": ({"rope_type": "yarn", "factor": 2.0, "scale": 3}, "unknown parameter 'scale'"),
        "partial": ({"rope_type": "default", "partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
    }
    for what, (scaling, message) in cases.items():
        raw["rope_scaling"] = scaling
        (tmp_path / "config.json").write_text(json.dumps(raw))
        with pytest.raises(ConfigError, match=message) as err:
            QwenConfig.from_hf(tmp_path)
        assert str(tmp_path / "config.json") in str(err.value), what
