"""HF checkpoint I/O: sharded loads, Qwen-7B v1 weights, save -> transformers, error cases."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.qwen import CheckpointError, ConfigError, load, save
from tests.helpers import assert_logits_match, hf_model, random_ids, save_hf_model


def test_sharded_checkpoint_loads(tmp_path):
    ref = hf_model("qwen2", tie_word_embeddings=False)
    save_hf_model(ref, tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    ours = load(tmp_path, dtype=torch.float32)
    ids = random_ids(2, 13)
    with torch.no_grad():
        assert_logits_match(ours(ids), ref, ids)


def test_tied_checkpoint_with_a_stored_head_loads_tied(tmp_path):
    ref = hf_model("qwen2", tie_word_embeddings=True)
    save_hf_model(ref, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()  # as some Qwen3 exports do
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours = load(tmp_path, dtype=torch.float32)
    assert ours.is_tied


def write_v1_checkpoint(ref, path):
    """Write `ref` (an MHA transformers Qwen2 model) in Qwen-7B v1 layout and config."""
    cfg = ref.config
    sd = ref.state_dict()
    out = {
        "transformer.wte.weight": sd["model.embed_tokens.weight"],
        "transformer.ln_f.weight": sd["model.norm.weight"],
        "lm_head.weight": sd["lm_head.weight"],
    }
    for i in range(cfg.num_hidden_layers):
        p, q = f"model.layers.{i}.", f"transformer.h.{i}."
        for kind in ("weight", "bias"):
            out[q + f"attn.c_attn.{kind}"] = torch.cat(
                [sd[p + f"self_attn.{n}_proj.{kind}"] for n in ("q", "k", "v")], dim=0
            )
        out[q + "attn.c_proj.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[q + "ln_1.weight"] = sd[p + "input_layernorm.weight"]
        out[q + "ln_2.weight"] = sd[p + "post_attention_layernorm.weight"]
        out[q + "mlp.w1.weight"] = sd[p + "mlp.up_proj.weight"]
        out[q + "mlp.w2.weight"] = sd[p + "mlp.gate_proj.weight"]
        out[q + "mlp.c_proj.weight"] = sd[p + "mlp.down_proj.weight"]
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, path / "model.safetensors", metadata={"format": "pt"})
    v1 = {
        "architectures": ["QWenLMHeadModel"],
        "model_type": "qwen",
        "auto_map": {"AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_hidden_layers": cfg.num_hidden_layers,
        "kv_channels": cfg.hidden_size // cfg.num_attention_heads,
        "intermediate_size": 2 * cfg.intermediate_size,
        "rotary_emb_base": cfg.rope_parameters["rope_theta"],
        "rotary_pct": 1.0,
        "layer_norm_epsilon": cfg.rms_norm_eps,
        "vocab_size": cfg.vocab_size,
        "seq_length": 256,
        "max_position_embeddings": 256,
        "no_bias": True,
        "bf16": False, "fp16": False, "fp32": True,
        "tie_word_embeddings": False,
    }
    (path / "config.json").write_text(json.dumps(v1))


def test_qwen_v1_checkpoint_gives_the_same_logits(tmp_path):
    ref = hf_model("qwen2", tie_word_embeddings=False, num_key_value_heads=4)  # v1 is MHA
    write_v1_checkpoint(ref, tmp_path / "v1")
    ours = load(tmp_path / "v1", dtype=torch.float32)
    ids = random_ids(2, 15)
    with torch.no_grad():
        assert_logits_match(ours(ids), ref, ids)
    # and it exports as a standard Qwen2 checkpoint that transformers reads
    from transformers import AutoModelForCausalLM

    save(ours, tmp_path / "as-qwen2")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "as-qwen2", dtype=torch.float32)
    with torch.no_grad():
        assert_logits_match(back(ids).logits, ref, ids)


@pytest.mark.parametrize("kind,tied", [("qwen2", True), ("qwen2", False), ("qwen3", False)])
def test_save_loads_in_transformers_without_missing_weights(tmp_path, kind, tied):
    from transformers import AutoModelForCausalLM

    ref = hf_model(kind, tie_word_embeddings=tied)
    save_hf_model(ref, tmp_path / "src")
    ours = load(tmp_path / "src", dtype=torch.float32)
    save(ours, tmp_path / "out", max_shard_size="60KB")
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert (tmp_path / "out" / "generation_config.json").exists()
    back, info = AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = random_ids(2, 11)
    with torch.no_grad():
        assert_logits_match(ours(ids), back, ids)
    # save -> load round trip is bit-exact
    again = load(tmp_path / "out", dtype=torch.float32)
    a, b = ours.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert again.is_tied == tied


def test_save_refuses_unmerged_lora(tmp_path):
    ours_dir = save_hf_model(hf_model("qwen2"), tmp_path / "src")
    model = load(ours_dir, dtype=torch.float32)
    model.model.layers[0].self_attn.q_proj.register_parameter("lora_A", torch.nn.Parameter(torch.zeros(1)))
    with pytest.raises(ValueError, match="lora.merge"):
        save(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_save_overwrites_atomically(tmp_path):
    model = load(save_hf_model(hf_model("qwen2"), tmp_path / "src"), dtype=torch.float32)
    save(model, tmp_path / "out")
    (tmp_path / "out" / "stale.txt").write_text("old run")
    save(model, tmp_path / "out")
    assert not (tmp_path / "out" / "stale.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging or old copy left


# ---------------------------------------------------------------------------- errors
def test_missing_config_json(tmp_path):
    save_hf_model(hf_model("qwen2"), tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json"):
        load(tmp_path)


def test_unknown_model_type(tmp_path):
    save_hf_model(hf_model("qwen2"), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "llama"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="'llama'"):
        load(tmp_path)


def test_missing_field_in_config(tmp_path):
    save_hf_model(hf_model("qwen2"), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="hidden_size"):
        load(tmp_path)


def test_truncated_safetensors(tmp_path):
    save_hf_model(hf_model("qwen2"), tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load(tmp_path)


def test_checkpoint_missing_a_bias(tmp_path):
    save_hf_model(hf_model("qwen2"), tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.1.self_attn.k_proj.bias"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.bias"):
        load(tmp_path)


def test_wrong_shape(tmp_path):
    save_hf_model(hf_model("qwen2"), tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"up_proj\.weight.*shape \(3, 3\)"):
        load(tmp_path)


def test_unexpected_tensor(tmp_path):
    save_hf_model(hf_model("qwen2"), tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.0.extra.weight'"):
        load(tmp_path)


def test_pickle_only_checkpoint_is_refused(tmp_path):
    save_hf_model(hf_model("qwen2"), tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        load(tmp_path)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        load(tmp_path / "nope")
