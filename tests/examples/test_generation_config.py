"""generation_config.json's eos list survives every folder we write (issue 30, item 9): a base
whose generation_config.json lists `[151645, 151643]` keeps the list, so HF's generate still
stops at <|endoftext|>; a chat-tuned model puts <|im_end|> first and keeps the rest. Read back
with transformers' GenerationConfig, the reader HF's generate uses."""

from __future__ import annotations

import json

import pytest
import torch

from tests.examples.conftest import run_script
from tests.examples.test_evaluate import QWEN_VOCAB, _peft_adapter
from tests.helpers import hf_model, save_hf_model

IM_END_ID, EOT_ID = 151645, 151643


def _base(path, eos):
    model = hf_model("qwen2", seed=1, **QWEN_VOCAB, eos_token_id=IM_END_ID, bos_token_id=EOT_ID)
    model.generation_config.eos_token_id = eos
    save_hf_model(model, path)
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == eos
    return path


def test_merge_keeps_the_base_eos_list(tmp_path):
    pytest.importorskip("peft")
    from transformers import GenerationConfig

    base = _base(tmp_path / "base", [IM_END_ID, EOT_ID])
    _peft_adapter(1, tmp_path / "adapter", base)
    proc = run_script("merge.py", "--adapter", tmp_path / "adapter", "--out", tmp_path / "merged", cache=tmp_path / "c")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert GenerationConfig.from_pretrained(tmp_path / "merged").eos_token_id == [IM_END_ID, EOT_ID]


BOTH = [IM_END_ID, EOT_ID]


@pytest.mark.parametrize("eos", [EOT_ID, BOTH, [EOT_ID, IM_END_ID]])
def test_save_and_chat_eos_keep_the_list(tmp_path, eos):
    """models.qwen.save (every stage's merged/ and full-finetuning output) and use_chat_eos
    (what sft.py and dpo.py apply before saving). config.json's eos (<|im_end|>) comes first,
    then the ids generation_config.json listed."""
    from transformers import GenerationConfig

    from models.qwen import load, save

    model = load(_base(tmp_path / "base", eos), dtype=torch.float32)
    save(model, tmp_path / "same")
    assert GenerationConfig.from_pretrained(tmp_path / "same").eos_token_id == BOTH
    save(model.use_chat_eos(), tmp_path / "chat")
    assert GenerationConfig.from_pretrained(tmp_path / "chat").eos_token_id == BOTH
