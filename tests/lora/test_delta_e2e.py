"""The end-to-end story on a tiny model with Qwen's real 151936-row vocabulary:

base (ChatML rows untrained, as in a base model) -> chat = base + a short SFT on ChatML
conversations; target = base + a short CPT on plain text; target + (chat - base) answers the
conversations in ChatML and stops at <|im_end|>, which the CPT model alone does not.
"""

from __future__ import annotations

import json

import torch

from lora.delta import instruction_residual
from models.qwen import ENDOFTEXT_ID, IM_END_ID, IM_START_ID, Qwen, QwenConfig, generate, load, save

USER, ASSISTANT, NL = 872, 77091, 198  # "user", "assistant", "\n" in Qwen's vocabulary
PAIRS = [  # (question ids, answer ids): content does not matter, the ChatML frame does
    ([3838, 374, 220, 17, 10, 17, 30], [19789, 13]),
    ([9707, 1879, 0], [9707, 0, 2585, 646]),
    ([4340, 653, 358, 1349, 264, 1034, 30], [10253, 1787, 368, 13]),
]


def prompt_ids(question: list[int]) -> list[int]:
    return [IM_START_ID, USER, NL] + question + [IM_END_ID, NL, IM_START_ID, ASSISTANT, NL]


def train(model: Qwen, batches, steps: int, lr: float) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    model.train()
    for step in range(steps):
        ids, labels = batches[step % len(batches)]
        loss = model(ids, labels=labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def chat_batch():
    rows = [prompt_ids(q) + a + [IM_END_ID] for q, a in PAIRS]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), ENDOFTEXT_ID)
    labels = torch.full((len(rows), width), -100)
    for i, ((q, a), row) in enumerate(zip(PAIRS, rows)):
        ids[i, : len(row)] = torch.tensor(row)
        start = len(prompt_ids(q))
        labels[i, start : len(row)] = torch.tensor(a + [IM_END_ID])  # assistant tokens and <|im_end|>
    return ids, labels


def text_batches(n: int = 4):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 50000, (4, 24), generator=g)
        ids[:, -1] = ENDOFTEXT_ID  # documents end with <|endoftext|>; no ChatML tokens
        out.append((ids, ids.clone()))
    return out


def answer(model: Qwen, question: list[int]) -> list[int]:
    p = torch.tensor([prompt_ids(question)])
    out = generate(model, p, max_new_tokens=8, temperature=0.0)  # eos from config.json
    new = out[0, p.shape[1]:].tolist()
    return new[: new.index(IM_END_ID) + 1] if IM_END_ID in new else new


def test_cpt_model_plus_residual_answers_in_chatml_and_stops(tmp_path):
    torch.manual_seed(0)
    cfg = QwenConfig(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                     rope_theta=10000.0, tie_word_embeddings=True, torch_dtype="float32")
    base = Qwen(cfg)
    with torch.no_grad():
        base.model.embed_tokens.weight[[IM_START_ID, IM_END_ID]] = 0.0  # never seen in pretraining
    save(base, tmp_path / "base")

    chat = load(tmp_path / "base", dtype=torch.float32)
    train(chat, [chat_batch()], steps=40, lr=5e-3)
    chat.config.eos_token_id = IM_END_ID
    save(chat, tmp_path / "chat")
    for q, a in PAIRS:  # the chat model itself has learned the conversations
        assert answer(chat, q) == a + [IM_END_ID]

    target = load(tmp_path / "base", dtype=torch.float32)
    train(target, text_batches(), steps=8, lr=3e-4)
    save(target, tmp_path / "cpt")

    out = instruction_residual(tmp_path / "base", tmp_path / "chat", tmp_path / "cpt", tmp_path / "out")
    rows = json.loads((out / "manifest.json").read_text())["special_rows"]["rows"]
    assert [r["row"] for r in rows if r["carried"]] == [IM_START_ID, IM_END_ID]
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == IM_END_ID

    merged = load(out, dtype=torch.float32)
    assert merged.config.eos_ids() == [IM_END_ID]
    assert torch.equal(merged.model.embed_tokens.weight[[IM_START_ID, IM_END_ID]],
                       chat.model.embed_tokens.weight[[IM_START_ID, IM_END_ID]])
    for q, a in PAIRS:
        got = answer(merged, q)
        assert got == a + [IM_END_ID], (q, got)
    cpt = load(tmp_path / "cpt", dtype=torch.float32)
    assert all(answer(cpt, q) != a + [IM_END_ID] for q, a in PAIRS)  # the residual is what makes it chat
