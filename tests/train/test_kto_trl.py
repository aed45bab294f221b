"""The whole KTO objective (train.kto.KTOObjective on our model, batches of data.kto_collate)
against TRL 1.16's KTOTrainer.compute_loss on a transformers + PEFT model with the same weights
and adapter, on the same rows and the same mismatched KL rows: the loss, every LoRA gradient,
the KL baseline and TRL's logged metrics. The reference of both is the adapter disabled."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import lora
from data import kto_collate
from tests.helpers import FLOOR_FACTOR, assert_close_to_reference, assert_grads_close, float64_twin, reference_floor
from tests.train.test_preference import PAD, VOCAB, with_adapters
from train.kto import KTOObjective

pytest.importorskip("trl")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
B = 6
LABELS = [True, False, False, True, True, False]


def rows(seed=10):
    """B unpaired rows: a prompt of 3-9 random ids, a completion of 2-7 (scored), a label."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for label in LABELS:
        p, c = int(torch.randint(3, 10, (1,), generator=g)), int(torch.randint(2, 8, (1,), generator=g))
        prompt, completion = torch.randint(0, VOCAB, (p,), generator=g), torch.randint(0, VOCAB, (c,), generator=g)
        out.append({"input_ids": torch.cat([prompt, completion]),
                    "labels": torch.cat([torch.full((p,), -100), completion]),
                    "prompt_length": torch.tensor(p), "label": torch.tensor(label)})
    return out


def trl_batch(items):
    """TRL's collated batch of the same rows; KL completions rotated by one, as its _prepare_dataset does."""
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    completions = [it["input_ids"][int(it["prompt_length"]):].tolist() for it in items]
    kl = [completions[-1]] + completions[:-1]
    examples = [{"prompt_ids": it["input_ids"][:int(it["prompt_length"])].tolist(), "completion_ids": c,
                 "KL_completion_ids": k, "label": bool(it["label"])} for it, c, k in zip(items, completions, kl)]
    return DataCollatorForUnpairedPreference(pad_token_id=PAD)(examples)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from tests.helpers import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("kto_trl") / "tiny", tie_word_embeddings=False, seed=3)[0]


@pytest.fixture(scope="module")
def hf_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "a": 1}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")),
                                   pad_token="<pad>", eos_token="<pad>")


def kto_trainer(ckpt, tmp_path, hf_tokenizer, monkeypatch, loss_type, adapter):
    import pyarrow as pa
    from datasets import Dataset
    from datasets.table import InMemoryTable
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from trl import KTOConfig, KTOTrainer

    # Only TRL's loss is under test: its dataset preparation (tokenising a placeholder) is skipped.
    monkeypatch.setattr(KTOTrainer, "_prepare_dataset", lambda self, dataset, *args: dataset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        placeholder = Dataset(InMemoryTable(pa.table({"prompt": ["a"], "completion": ["b"], "label": [True]})),
                              fingerprint="placeholder")
        args = KTOConfig(output_dir=str(tmp_path / "trl"), beta=0.3, desirable_weight=1.0, undesirable_weight=1.7,
                         loss_type=loss_type, report_to="none", use_cpu=True, bf16=False,
                         gradient_checkpointing=False, per_device_train_batch_size=B)
        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
        trainer = KTOTrainer(model=AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32), args=args,
                             processing_class=hf_tokenizer, train_dataset=placeholder, peft_config=peft_config)
    result = set_peft_model_state_dict(trainer.model, load_file(adapter / "adapter_model.safetensors"))
    assert not result.unexpected_keys
    return trainer


def trl_loss(trainer, model, batch):
    """(loss after its backward, logged metrics) of TRL's compute_loss with `model` as policy and reference."""
    policy, trainer.model = trainer.model, model   # its reference pass runs on trainer.model
    try:
        model.train()
        trainer._metrics["train"].clear()
        loss = trainer.compute_loss(model, batch)
        loss.backward()
    finally:
        trainer.model = policy
    return loss.detach(), {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_objective_matches_trl_kto_trainer(ckpt, tmp_path, hf_tokenizer, monkeypatch, loss_type):
    ours = with_adapters(ckpt, seed=5)
    lora.save(ours, tmp_path / "adapter")
    trainer = kto_trainer(ckpt, tmp_path, hf_tokenizer, monkeypatch, loss_type, tmp_path / "adapter")
    items = rows()
    batch = trl_batch(items)
    twin = float64_twin(trainer.model)
    loss32, m32 = trl_loss(trainer, trainer.model, batch)
    loss64, m64 = trl_loss(trainer, twin, batch)

    objective = KTOObjective(loss_type, beta=0.3, desirable_weight=1.0, undesirable_weight=1.7)
    ours.train()
    ours_batch = kto_collate(items, pad_id=PAD)
    assert objective.count(ours_batch) == B
    loss_sum, sums = objective(ours, ours_batch)
    (loss_sum / B).backward()
    metrics = objective.metric_means({k: float(v) for k, v in sums.items()}, B)

    assert_close_to_reference(loss_sum.detach() / B, loss32, loss64, what="loss")
    peft_names = {n.replace("base_model.model.", "").replace(".default", ""): n
                  for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert set(peft_names) == {n for n, p in ours.named_parameters() if p.requires_grad}
    assert_grads_close(ours, trainer.model, twin, lambda m, name: m.get_parameter(peft_names[name]).grad)

    # entropy and logits/*: statistics of the full logits, which our chunked head never builds
    want = {k for k in m32 if k not in ("entropy", "num_tokens") and not k.startswith("logits/")}
    assert want <= set(metrics) and {"count/chosen", "count/rejected"} <= set(metrics)
    assert (metrics["count/chosen"], metrics["count/rejected"]) == (3, 3)
    for key in ("logps/chosen", "logps/rejected"):
        assert_close_to_reference(torch.tensor(metrics[key]), torch.tensor(m32[key]),
                                  torch.tensor(m64[key], dtype=torch.float64), what=key)
    # rewards and the KL baseline are differences of summed log-probs that nearly cancel: their
    # error is that of the log-probs (absolute), not a fraction of themselves. Bound: 8 x the
    # log-probs' own fp32-vs-float64 error, for each of the two terms (times beta for a reward).
    floor = max(reference_floor(torch.tensor(m32[k]), torch.tensor(m64[k], dtype=torch.float64)) * abs(m64[k])
                for k in ("logps/chosen", "logps/rejected"))
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(metrics[key] - m32[key]) <= FLOOR_FACTOR * 0.3 * 2 * floor, key
    assert abs(metrics["kl"] - m32["kl"]) <= FLOOR_FACTOR * 2 * floor
    assert m32["rewards/margins"] != 0.0   # the adapter is not a no-op
    if loss_type == "kto":
        assert m32["kl"] > 0, "the KL baseline is exercised (not clamped to 0)"
    else:
        assert metrics["kl"] == m32["kl"] == 0.0
