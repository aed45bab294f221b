"""GGUF export (models.qwen.export) read back with gguf's own GGUFReader, against references we
did not write: the safetensors transformers saved (tensor values, via safetensors + torch
casts), transformers' config and tokenizer (metadata, vocabulary as llama.cpp's converter
builds it), llama.cpp's tensor names and key names, and - where llama-cpp-python is installed -
llama.cpp itself running the file (tokens, logits, greedy output).

Most tests use tiny models with a 259-token byte-level tokenizer (320 rows) so that the file
reads back in milliseconds; one model has Qwen's real 151936-row vocabulary.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from models.qwen import IM_END_ID, Tokenizer
from models.qwen.tokenizer import ENDOFTEXT, IM_END, IM_START, AddedToken
from tests.helpers import hf_model, save_hf_model

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import GGUFReader, Keys  # noqa: E402

from models.qwen.export import ExportError, export_gguf, looks_special, modelfile_text, write_modelfile  # noqa: E402

# Q8_0 blocks are 32 wide: hidden 64 quantises, the MLP width 88 (down_proj's rows) falls back
# to F16, as does Qwen3's o_proj (rows of 4 heads x head_dim 20 = 80).
# config.json says eos = <|im_end|> (258) while the tokenizer config says <|endoftext|> (256): the
# config decides. It names no bos or pad: those come from the tokenizer (<|endoftext|>).
SMALL = dict(vocab_size=320, hidden_size=64, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
             eos_token_id=258)
SMALL_QWEN3 = dict(SMALL, head_dim=20)

# llama.cpp's GGUF name of every Qwen2/Qwen3 checkpoint tensor (convert_hf_to_gguf.py output).
GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}


def llama_cpp_name(hf_name: str) -> str:
    if hf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[hf_name]
    _, _, i, rest = hf_name.split(".", 3)
    return f"blk.{i}.{LAYER_NAMES[rest]}"


def byte_tokenizer(*extra: AddedToken) -> Tokenizer:
    """256 byte tokens and Qwen's three control tokens (ids 256-258): a Qwen tokenizer in miniature."""
    ranks = {bytes([b]): b for b in range(256)}
    return Tokenizer(ranks, [AddedToken(256 + i, t) for i, t in enumerate((ENDOFTEXT, IM_START, IM_END))] + list(extra))


def write_model(path: Path, kind: str, dtype=torch.float32, tokenizer=None, seed: int = 0, **shape):
    """A random transformers model saved with its tokenizer; returns (path, transformers config)."""
    model = hf_model(kind, seed=seed, **shape).to(dtype)
    save_hf_model(model, path)
    (tokenizer or byte_tokenizer()).save_pretrained(path)
    return path, model.config


def read(path: Path):
    reader = GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    return fields, {t.name: t for t in reader.tensors}


def q8_0_bound(x: torch.Tensor) -> torch.Tensor:
    """Per-element bound of |x - dequant(quant(x))| for Q8_0: half a step of d = amax/127, plus
    the rounding of d to f16 times the largest code (127)."""
    blocks = x.double().reshape(-1, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    d16 = d.float().half().double()
    bound = d / 2 + 127 * (d - d16).abs() + 1e-12
    return bound.expand_as(blocks).reshape(x.shape)


# ---------------------------------------------------------------------- tensors and metadata
CASES = [  # (architecture, source dtype, tied head, GGUF type)
    ("qwen2", torch.float32, True, "f16"),
    ("qwen2", torch.float32, True, "bf16"),
    ("qwen2", torch.float32, True, "q8_0"),
    ("qwen3", torch.float32, False, "f16"),
    ("qwen3", torch.float32, False, "q8_0"),
    ("qwen2", torch.bfloat16, False, "bf16"),
    ("qwen2", torch.bfloat16, False, "f16"),
]


@pytest.mark.parametrize("kind,dtype,tied,file_type", CASES, ids=[f"{k}-{str(d)[6:]}-{'tied' if t else 'untied'}-{f}"
                                                                   for k, d, t, f in CASES])
def test_tensors_and_metadata_read_back(tmp_path, kind, dtype, tied, file_type):
    shape = SMALL_QWEN3 if kind == "qwen3" else SMALL
    model_dir, config = write_model(tmp_path / "model", kind, dtype, tie_word_embeddings=tied, **shape)
    summary = export_gguf(model_dir, tmp_path / "m.gguf", file_type)
    fields, tensors = read(summary.path)

    source = load_file(str(model_dir / "model.safetensors"))
    if tied:  # transformers leaves the tied head out of the file; llama.cpp reuses token_embd
        assert "lm_head.weight" not in source
    assert set(tensors) == {llama_cpp_name(k) for k in source}
    assert ("output.weight" in tensors) == (not tied)
    matrix_type = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[file_type]
    for hf_name, x in source.items():
        t = tensors[llama_cpp_name(hf_name)]
        assert [int(n) for n in reversed(t.shape)] == list(x.shape), hf_name  # GGUF stores ggml order
        if x.dim() == 1:
            assert t.tensor_type == Q.F32, hf_name
            assert np.array_equal(np.asarray(t.data), x.float().numpy()), hf_name
            continue
        expected_type = Q.F16 if (matrix_type == Q.Q8_0 and x.shape[-1] % 32) else matrix_type
        assert t.tensor_type == expected_type, (hf_name, t.tensor_type)
        data = np.asarray(t.data)
        if expected_type == Q.F16:
            assert np.array_equal(data, x.to(torch.float16).numpy()), hf_name
        elif expected_type == Q.BF16:
            bits = data.view(np.uint16).reshape(x.shape)
            assert np.array_equal(bits, x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)), hf_name
        else:
            deq = torch.from_numpy(gguf.quants.dequantize(data, Q.Q8_0).copy()).reshape(x.shape)
            err = (deq.double() - x.double()).abs()
            assert bool((err <= q8_0_bound(x)).all()), (hf_name, float(err.max()))
            assert float(err.max()) > 0  # it really was quantised

    arch = kind
    assert fields[Keys.General.ARCHITECTURE] == arch == gguf.MODEL_ARCH_NAMES[
        {"qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3}[kind]]
    head_dim = shape.get("head_dim", shape["hidden_size"] // shape["num_attention_heads"])
    expected = {
        f"{arch}.block_count": config.num_hidden_layers,
        f"{arch}.context_length": config.max_position_embeddings,
        f"{arch}.embedding_length": config.hidden_size,
        f"{arch}.feed_forward_length": config.intermediate_size,
        f"{arch}.attention.head_count": config.num_attention_heads,
        f"{arch}.attention.head_count_kv": config.num_key_value_heads,
        f"{arch}.attention.key_length": head_dim,
        f"{arch}.attention.value_length": head_dim,
        Keys.General.FILE_TYPE: {"f16": 1, "bf16": 32, "q8_0": 7}[file_type],
        Keys.General.QUANTIZATION_VERSION: 2,
        Keys.General.TYPE: "model",
        Keys.Tokenizer.MODEL: "gpt2",
        Keys.Tokenizer.PRE: "qwen2",
        Keys.Tokenizer.ADD_BOS: False,
    }
    for key, value in expected.items():
        assert fields[key] == value, key
    assert fields[f"{arch}.rope.freq_base"] == pytest.approx(config.rope_parameters["rope_theta"], rel=1e-7)
    assert fields[f"{arch}.attention.layer_norm_rms_epsilon"] == np.float32(config.rms_norm_eps)
    # The byte tokenizer: 256 bytes in their byte-level spelling, 3 controls, padding to 320 rows.
    tokens, types = fields[Keys.Tokenizer.LIST], fields[Keys.Tokenizer.TOKEN_TYPE]
    assert len(tokens) == len(types) == 320
    assert tokens[32] == "Ġ" and tokens[65] == "A" and tokens[256:259] == [ENDOFTEXT, IM_START, IM_END]
    assert tokens[300] == "[PAD300]" and types[300] == gguf.TokenType.UNUSED
    assert Keys.Tokenizer.MERGES not in fields  # bytes only: nothing to merge
    ids = fields[Keys.Tokenizer.EOS_ID], fields[Keys.Tokenizer.BOS_ID], fields[Keys.Tokenizer.PAD_ID]
    assert ids == (258, 256, 256)


# ---------------------------------------------------------------------- Qwen3-MoE
SMALL_MOE = dict(SMALL_QWEN3, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
EXPERT_KINDS = {"gate": gguf.MODEL_TENSOR.FFN_GATE_EXP, "up": gguf.MODEL_TENSOR.FFN_UP_EXP,
                "down": gguf.MODEL_TENSOR.FFN_DOWN_EXP}


@pytest.mark.parametrize("file_type", ["f16", "q8_0"])
def test_qwen3_moe_as_llama_cpp_converts_it(tmp_path, file_type):
    """convert_hf_to_gguf.py's Qwen3MoeModel (Qwen2MoeModel.modify_tensors): each layer's experts
    stacked in expert order into blk.N.ffn_{gate,up,down}_exps [n_expert, rows, cols], the
    router as blk.N.ffn_gate_inp in F32, expert_count / expert_used_count /
    expert_feed_forward_length; names and keys from the gguf package's tables, values from
    the safetensors transformers wrote."""
    model_dir, config = write_model(tmp_path / "model", "qwen3_moe", tie_word_embeddings=False, **SMALL_MOE)
    summary = export_gguf(model_dir, tmp_path / "m.gguf", file_type)
    fields, tensors = read(summary.path)
    source = load_file(str(model_dir / "model.safetensors"))
    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN3MOE]
    n_exp = config.num_local_experts

    expected = {}   # GGUF name -> the checkpoint tensor(s) it holds
    for name, x in source.items():
        if ".mlp.experts." in name:
            continue
        if name.endswith("mlp.gate.weight"):
            expected[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.FFN_GATE_INP].format(bid=name.split(".")[2]) + ".weight"] = x
        else:
            expected[llama_cpp_name(name)] = x
    for i in range(config.num_hidden_layers):
        for w, kind in EXPERT_KINDS.items():
            stacked = torch.stack([source[f"model.layers.{i}.mlp.experts.{e}.{w}_proj.weight"] for e in range(n_exp)])
            expected[gguf.TENSOR_NAMES[kind].format(bid=i) + ".weight"] = stacked
    assert set(tensors) == set(expected)
    for name, x in expected.items():
        t = tensors[name]
        assert [int(n) for n in reversed(t.shape)] == list(x.shape), name
        if x.dim() == 1 or "ffn_gate_inp" in name:   # norms and the router stay F32
            assert t.tensor_type == Q.F32, name
            assert np.array_equal(np.asarray(t.data).reshape(x.shape), x.numpy()), name
            continue
        wanted = Q.Q8_0 if file_type == "q8_0" and x.shape[-1] % 32 == 0 else Q.F16
        assert t.tensor_type == wanted, (name, t.tensor_type)
        data = np.asarray(t.data)
        if wanted == Q.F16:
            assert np.array_equal(data.reshape(x.shape), x.to(torch.float16).numpy()), name
        else:
            deq = torch.from_numpy(gguf.quants.dequantize(data, Q.Q8_0).copy()).reshape(x.shape)
            assert bool(((deq.double() - x.double()).abs() <= q8_0_bound(x)).all()), name

    assert fields[Keys.General.ARCHITECTURE] == arch
    moe_keys = {Keys.LLM.EXPERT_COUNT: n_exp, Keys.LLM.EXPERT_USED_COUNT: config.num_experts_per_tok,
                Keys.LLM.EXPERT_FEED_FORWARD_LENGTH: config.moe_intermediate_size,
                Keys.LLM.FEED_FORWARD_LENGTH: config.intermediate_size, Keys.LLM.BLOCK_COUNT: config.num_hidden_layers,
                Keys.Attention.KEY_LENGTH: SMALL_MOE["head_dim"]}
    for key, value in moe_keys.items():
        assert fields[key.format(arch=arch)] == value, key
    # general.size_label as gguf.size_label gives it for (total, shared, per-expert, experts) counts.
    assert fields[Keys.General.SIZE_LABEL] == gguf.size_label(
        sum(int(np.prod(x.shape)) for x in expected.values()),
        sum(int(np.prod(x.shape)) for n, x in expected.items() if "_exps." not in n),
        sum(int(np.prod(x.shape)) // n_exp for n, x in expected.items() if "_exps." in n), n_exp)


# ---------------------------------------------------------------------- Qwen's real vocabulary
REAL = dict(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rope_theta=1_000_000.0, rms_norm_eps=1e-6)
EXTRA_TOKEN = "数据库索引"  # a vocabulary extension (non-special text token, id 151665)


@pytest.fixture(scope="module")
def chat_tokenizer_dir(tmp_path_factory):
    """Qwen2.5's tokenizer, chat-tuned (eos <|im_end|>), with one added text token."""
    tok = Tokenizer.default().with_added_tokens([EXTRA_TOKEN]).set_eos(IM_END)
    return tok.save_pretrained(tmp_path_factory.mktemp("chat-tokenizer"))


def real_vocab_model(path: Path, tokenizer_dir: Path, kind: str, seed: int, **shape) -> Path:
    """A chat-tuned tiny model with Qwen's 151936 rows: eos <|im_end|> in config.json too."""
    model = hf_model(kind, seed=seed, **{**REAL, **shape}, bos_token_id=151643, eos_token_id=IM_END_ID)
    save_hf_model(model, path)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, path / f.name)
    return path


OLLAMA_CASES = [  # (system message or None, the turns after it)
    ("You are terse.", [("user", "What is a socket?")]),
    (None, [("user", "Hi")]),
    ("Be brief.", [("user", "What is TLS?"), ("assistant", "Encryption."), ("user", "And a queue?")]),
    (None, [("user", "你好"), ("assistant", "你好！"), ("user", "再见")]),
]


@pytest.mark.parametrize("system,turns", OLLAMA_CASES)
def test_modelfile_template_renders_our_chat_template(tmp_path, chat_tokenizer_dir, system, turns):
    """Issue 30, item 9: the Modelfile's TEMPLATE (Go text/template, emulated by
    tests/models/go_template.py) renders a conversation as Qwen2.5's chat template does with
    add_generation_prompt: Ollama passes the system message as .System (else the Modelfile's
    SYSTEM, the template's default) and the other turns as .Messages."""
    from tests.models.go_template import render

    text = modelfile_text(tmp_path / "m.gguf", chat_tokenizer_dir)
    assert text.count('TEMPLATE """') == 1 and text.count('"""') == 4   # TEMPLATE and SYSTEM, each closed
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    default_system = text.split('SYSTEM """', 1)[1].split('"""', 1)[0]
    assert default_system == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

    messages = [{"role": r, "content": c} for r, c in turns]
    expected = Tokenizer.from_pretrained(chat_tokenizer_dir).apply_chat_template(
        ([{"role": "system", "content": system}] if system else []) + messages,
        add_generation_prompt=True, tokenize=False)
    data = {"System": system or default_system, "Tools": None, "Response": "",
            "Messages": [{"Role": m["role"], "Content": m["content"], "ToolCalls": None} for m in messages]}
    assert render(template, data) == expected
    if len(turns) == 1:   # /api/generate's form: .Prompt, no .Messages
        assert render(template, {"System": system or default_system, "Prompt": turns[0][1], "Response": ""}) == expected


def test_no_template_for_a_chat_template_that_is_not_chatml(tmp_path):
    """A folder whose chat template does not write ChatML gets no TEMPLATE (Ollama would
    otherwise prompt it wrongly). (One with no chat template is chatted with in plain ChatML by
    our tools, so it gets the ChatML TEMPLATE.)"""
    model_dir, _ = write_model(tmp_path / "m", "qwen2", tie_word_embeddings=True, **SMALL)
    assert 'TEMPLATE """' in modelfile_text(tmp_path / "m.gguf", model_dir)   # the byte tokenizer's is ChatML
    cfg_path = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = "{% for m in messages %}### {{ m.role }}: {{ m.content }}\n{% endfor %}"
    cfg_path.write_text(json.dumps(cfg))
    for f in model_dir.glob("chat_template.*"):
        f.unlink()
    text = modelfile_text(tmp_path / "m.gguf", model_dir)
    assert "TEMPLATE" not in text and "SYSTEM" not in text and text.count("PARAMETER stop") == 2


def llama_cpp_vocab(model_dir: Path, rows: int):
    """Tokens and types exactly as convert_hf_to_gguf.py's get_vocab_base builds them (transformers)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    reverse = {i: t for t, i in tok.get_vocab().items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(rows):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if not decoder[i].normalized:
                token = tok.decode(tok.encode(token, add_special_tokens=False))
            if decoder[i].special or looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    state = json.loads(tok.backend_tokenizer.to_str())
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    return tokens, types, merges


@pytest.mark.slow
def test_real_vocabulary_as_llama_cpp_converts_it(tmp_path, chat_tokenizer_dir):
    model_dir = real_vocab_model(tmp_path / "chat", chat_tokenizer_dir, "qwen2", seed=0, tie_word_embeddings=True)
    summary = export_gguf(model_dir, tmp_path / "chat.gguf", "f16")
    fields, tensors = read(summary.path)

    tokens, types, merges = llama_cpp_vocab(model_dir, REAL["vocab_size"])
    assert fields[Keys.Tokenizer.LIST] == tokens
    assert [int(t) for t in fields[Keys.Tokenizer.TOKEN_TYPE]] == [int(t) for t in types]
    assert fields[Keys.Tokenizer.MERGES] == merges
    assert len(tokens) == [int(n) for n in tensors["token_embd.weight"].shape][1] == 151936
    # The cases that bite: a non-special added token that looks special is CONTROL, <tool_call>
    # and a vocabulary extension are USER_DEFINED, the unused rows are [PAD] placeholders.
    got = dict(zip(tokens, fields[Keys.Tokenizer.TOKEN_TYPE]))
    assert got["<|fim_prefix|>"] == got["<|im_end|>"] == gguf.TokenType.CONTROL
    assert got["<tool_call>"] == got[EXTRA_TOKEN] == gguf.TokenType.USER_DEFINED
    assert tokens[151666] == "[PAD151666]" and tokens[9707] == "Hello" and tokens[1879] == "Ġworld"

    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert fields[Keys.Tokenizer.CHAT_TEMPLATE] == tok_config["chat_template"]
    assert fields[Keys.Tokenizer.EOS_ID] == IM_END_ID == tokens.index(tok_config["eos_token"])
    assert fields[Keys.Tokenizer.BOS_ID] == 151643
    assert tokens[fields[Keys.Tokenizer.PAD_ID]] == tok_config["pad_token"] == ENDOFTEXT
    assert fields[Keys.Tokenizer.ADD_BOS] is False
    assert summary.eos_token == IM_END


# ---------------------------------------------------------------------- llama.cpp runs the file
def _llama_cpp_importable() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except Exception:  # not installed (CI: it compiles llama.cpp from source), or a broken build
        return False
    return True


requires_llama_cpp = pytest.mark.skipif(not _llama_cpp_importable(),
                                        reason="llama_cpp (llama-cpp-python) is not importable")


def llama_greedy(llm, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """llama.cpp's greedy continuation (argmax of its own logits), and its logits at every position."""
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out, np.array(llm.scores[: llm.n_tokens])


# (architecture, tied head, seed, GGUF type, tolerance on logits relative to their largest).
# Measured (llama-cpp-python 0.3.36): f16 within 4-7e-4, bf16 3.4e-3, q8_0 1-1.3e-2 (llama.cpp
# also rounds the activations to 8 bits in its Q8_0 matmuls). The seeds give greedy margins
# above twice the tolerance at every step, so the greedy paths are comparable (random weights
# and 151936 outputs make near-ties common: the test asserts the margins rather than trusting luck).
LLAMA_CASES = [("qwen2", True, 0, "f16", 1e-3), ("qwen3", False, 0, "f16", 1e-3),
               ("qwen2", True, 0, "bf16", 1e-2), ("qwen2", True, 0, "q8_0", 2.5e-2)]


@requires_llama_cpp
@pytest.mark.parametrize("kind,tied,seed,file_type,tolerance", LLAMA_CASES,
                         ids=[f"{c[0]}-{c[3]}" for c in LLAMA_CASES])
def test_llama_cpp_greedy_equals_ours(tmp_path, chat_tokenizer_dir, kind, tied, seed, file_type, tolerance):
    from llama_cpp import Llama

    from models.qwen import generate, load

    shape = {"head_dim": 16} if kind == "qwen3" else {}  # Qwen3: head_dim != hidden / heads
    model_dir = real_vocab_model(tmp_path / kind, chat_tokenizer_dir, kind, seed=seed, tie_word_embeddings=tied,
                                 **shape)
    path = export_gguf(model_dir, tmp_path / "m.gguf", file_type).path
    llm = Llama(model_path=str(path), n_ctx=128, logits_all=True, n_threads=2, verbose=False, seed=0)

    tok = Tokenizer.from_pretrained(model_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "Hello world, how are you?"}],
                                   add_generation_prompt=True, tokenize=False)
    prompt = tok.encode(text, allowed_special="all")
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == prompt
    assert llm.token_eos() == IM_END_ID

    ours = load(model_dir, dtype=torch.float32)
    n = 8
    ids = generate(ours, torch.tensor([prompt]), max_new_tokens=n, temperature=0.0, eos_ids=[-1])[0]
    with torch.no_grad():
        ref = ours(ids[None])[0].numpy()  # our logits along our greedy path
    theirs, logits = llama_greedy(llm, prompt, n)
    scale = np.abs(ref).max()
    top2 = np.sort(ref[len(prompt) - 1: -1], axis=-1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 2 * tolerance * scale, "near-tie in our greedy path: pick another seed"
    assert theirs == ids[len(prompt):].tolist()
    assert np.abs(logits - ref[: len(logits)]).max() <= tolerance * scale


# ---------------------------------------------------------------------- bad input
def test_refuses_what_it_cannot_export(tmp_path):
    model_dir, _ = write_model(tmp_path / "m", "qwen2", tie_word_embeddings=True, **SMALL)
    with pytest.raises(ExportError, match="'q4_k'.*f16, bf16, q8_0"):
        export_gguf(model_dir, tmp_path / "x.gguf", "q4_k")

    # An unmerged LoRA tensor, then a missing one: named, with the file.
    file = str(model_dir / "model.safetensors")
    weights = load_file(file)
    save_file(dict(weights, **{"model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64)}), file)
    with pytest.raises(ExportError, match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.q_proj\.lora_A"):
        export_gguf(model_dir, tmp_path / "x.gguf")
    save_file({k: v for k, v in weights.items() if k != "model.layers.1.mlp.up_proj.weight"}, file)
    with pytest.raises(ExportError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' is missing"):
        export_gguf(model_dir, tmp_path / "x.gguf")
    save_file(weights, file)

    # Quantised weights (a QLoRA base saved as is).
    cfg = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(dict(cfg, quantization_config={"quant_method": "bitsandbytes"})))
    with pytest.raises(ExportError, match="quantised"):
        export_gguf(model_dir, tmp_path / "x.gguf")
    (model_dir / "config.json").write_text(json.dumps(cfg))

    # A Qwen3-MoE with a dense layer, which llama.cpp's qwen3moe has no place for: refused from
    # config.json before any tensor is read (the hybrid families' refusals: test_gguf_hybrid.py).
    other = tmp_path / "other"
    other.mkdir()
    moe = dict(cfg, model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], num_experts=4,
               num_experts_per_tok=2, moe_intermediate_size=16)
    (other / "config.json").write_text(json.dumps(dict(moe, mlp_only_layers=[1])))
    with pytest.raises(ExportError, match=r"config\.json: layer 1 is dense .* qwen3moe"):
        export_gguf(other, tmp_path / "x.gguf")

    # A tokenizer with more tokens than the model has rows; then no tokenizer at all.
    byte_tokenizer(*(AddedToken(259 + i, f"<|extra{i}|>") for i in range(142))).save_pretrained(model_dir)
    with pytest.raises(ExportError, match="401 tokens but config.json vocab_size is 320"):
        export_gguf(model_dir, tmp_path / "x.gguf")
    for f in model_dir.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "merges", "qwen.tiktoken")):
            f.unlink()
    with pytest.raises(ExportError, match="needs the model's tokenizer"):
        export_gguf(model_dir, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp*"))


def test_file_is_replaced_whole_and_modelfile(tmp_path):
    model_dir, _ = write_model(tmp_path / "m", "qwen3", tie_word_embeddings=False, **SMALL_QWEN3)
    out = tmp_path / "out" / "chat-q8_0.gguf"
    first = export_gguf(model_dir, out, "f16")
    size_f16 = first.n_bytes
    second = export_gguf(model_dir, out, "q8_0")  # same path: replaced, no temp file left
    assert second.n_bytes == out.stat().st_size < size_f16
    assert [p.name for p in out.parent.iterdir()] == [out.name]
    modelfile = write_modelfile(out)   # no model folder: no owner, no TEMPLATE
    assert modelfile == out.parent / "Modelfile"
    text = modelfile.read_text(encoding="utf-8")
    assert text == modelfile_text(out)
    assert text.splitlines() == ["FROM ./chat-q8_0.gguf", 'PARAMETER stop "<|im_end|>"',
                                 'PARAMETER stop "<|endoftext|>"']
    write_modelfile(out, model_dir)
    lines = modelfile.read_text(encoding="utf-8").splitlines()
    assert lines[:3] == [f"# qwen-tune export of {model_dir.resolve()}", "FROM ./chat-q8_0.gguf", 'TEMPLATE """{{- if .Messages }}']
    assert lines[-2:] == ['PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|endoftext|>"']
