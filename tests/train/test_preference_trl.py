"""The preference objectives against TRL's own code (runs only where `trl` is installed).

DPO and IPO: TRL's DPOTrainer.compute_loss on a transformers + PEFT model (reference = the
adapter disabled) and the same batch, against our objective on our model with the same adapter.
SimPO and ORPO: TRL's CPOTrainer.cpo_loss and ORPOTrainer.odds_ratio_loss on the same log-probs.
"""

from __future__ import annotations

import os
import types
import warnings

import pytest
import torch

import lora
from tests.helpers import FLOOR_FACTOR, assert_close_to_reference, float64_twin, reference_floor
from tests.train.test_preference import collate, synthetic_items, with_adapters
from train.preference import PreferenceObjective

pytest.importorskip("trl")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

TRL_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
               "logps/rejected")


def trl_batch(items):
    """TRL's collated batch (prompt + completion rows, chosen first) for the same pairs."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    examples = []
    for it in items:
        prompt = int((it["chosen_labels"] != -100).nonzero()[0])
        examples.append({"prompt_ids": it["chosen_input_ids"][:prompt].tolist(),
                         "chosen_ids": it["chosen_input_ids"][prompt:].tolist(),
                         "rejected_ids": it["rejected_input_ids"][prompt:].tolist()})
    return DataCollatorForPreference(pad_token_id=0)(examples)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from tests.helpers import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("pref_trl") / "tiny", tie_word_embeddings=False, seed=3)[0]


@pytest.mark.parametrize("kind", ["sigmoid", "ipo"])
def test_dpo_and_ipo_match_trl_dpo_trainer(ckpt, tmp_path, hf_tokenizer, monkeypatch, kind):
    import pyarrow as pa
    from datasets import Dataset
    from datasets.table import InMemoryTable
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    # Only TRL's loss is under test: its dataset preparation (tokenising a placeholder) is skipped.
    monkeypatch.setattr(DPOTrainer, "_prepare_dataset", lambda self, dataset, *args: dataset)
    ours = with_adapters(ckpt, seed=5)
    lora.save(ours, tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # A placeholder dataset of one row (a fixed fingerprint spares datasets from hashing it).
        placeholder = Dataset(InMemoryTable(pa.table({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"]})),
                              fingerprint="placeholder")
        args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.5, loss_type=[kind], report_to="none",
                         use_cpu=True, bf16=False, gradient_checkpointing=False, per_device_train_batch_size=3)
        # A new adapter (peft_config): TRL's reference is then the model with the adapter disabled, as ours.
        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
        trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32), args=args,
                             processing_class=hf_tokenizer, train_dataset=placeholder, peft_config=peft_config)
    result = set_peft_model_state_dict(trainer.model, load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert not result.unexpected_keys
    items = synthetic_items(3, seed=7)
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, trl_batch(items))
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    # the floor: TRL's same loss on the float64 twin of its model
    trl_loss64 = trainer.compute_loss(float64_twin(trainer.model), trl_batch(items))
    trl_metrics64 = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    loss_sum, metrics = PreferenceObjective(kind, beta=0.5)(ours, collate(items))
    assert trl_metrics["rewards/margins"] != 0.0  # the adapter is not a no-op
    assert_close_to_reference(loss_sum.detach() / 3, trl_loss.detach(), trl_loss64.detach(), what="loss")
    logps = [k for k in TRL_METRICS if k.startswith("logps/")]
    for key in logps:
        assert_close_to_reference(metrics[key].detach() / 3, torch.tensor(trl_metrics[key]),
                                  torch.tensor(trl_metrics64[key], dtype=torch.float64), what=key)
    # A reward is beta x (policy - reference) summed log-probs, which nearly cancel: its error is
    # that of the log-probs, not a fraction of the reward itself. Bound: 8 x the log-probs' own
    # fp32-vs-float64 error (absolute), for each of the two terms, times beta (0.5).
    floor = max(reference_floor(torch.tensor(trl_metrics[k]), torch.tensor(trl_metrics64[k], dtype=torch.float64))
                * abs(trl_metrics64[k]) for k in logps)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(metrics[key].item() / 3 - trl_metrics[key]) <= FLOOR_FACTOR * 0.5 * 2 * floor, key
    # a count of pairs over 3: equal up to TRL's fp32 rounding of the fraction (6e-8)
    assert metrics["rewards/accuracies"].item() / 3 == pytest.approx(trl_metrics["rewards/accuracies"], abs=1e-6)


@pytest.fixture(scope="module")
def hf_tokenizer():
    """DPOTrainer wants a tokenizer with a pad token; the batches here are ids, so a one-word one does."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "a": 1}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")),
                                   pad_token="<pad>", eos_token="<pad>")


def _logps(B=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_c, n_r = torch.randint(1, 30, (B,), generator=g), torch.randint(1, 30, (B,), generator=g)
    return -torch.rand(B, generator=g) * n_c * 2, -torch.rand(B, generator=g) * n_r * 2, n_c, n_r


@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
def test_simpo_matches_trl_cpo_trainer(label_smoothing):
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    pc, pr, n_c, n_r = _logps()
    stub = types.SimpleNamespace(beta=2.0, label_smoothing=label_smoothing, loss_type="simpo", simpo_gamma=0.8,
                                 alpha=0.0, accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    # TRL's CPOTrainer scores SimPO with length-averaged log-probs (average_log_prob=True).
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(stub, pc / n_c, pr / n_r)
    ours, metrics = PreferenceObjective("simpo", beta=2.0, gamma=0.8, label_smoothing=label_smoothing).pair_losses(
        pc, pr, n_c, n_r)
    # elementwise formulas on the same fp32 inputs, no reductions: a few ulps (2**-23 = 1.2e-7)
    # apart; rtol 1e-6 is 8 of them
    assert torch.allclose(ours, losses, rtol=1e-6, atol=1e-7)
    assert torch.allclose(metrics["rewards/chosen"], chosen_rewards, rtol=1e-6)
    assert torch.allclose(metrics["rewards/rejected"], rejected_rewards, rtol=1e-6)


def test_orpo_odds_ratio_matches_trl_orpo_trainer():
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    pc, pr, n_c, n_r = _logps(seed=1)
    stub = types.SimpleNamespace(beta=0.25, accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    # ORPOTrainer: average_log_prob=True; loss = nll - mean(beta * log sigmoid(log odds)).
    losses, chosen_rewards, rejected_rewards, ratio, log_odds = ORPOTrainer.odds_ratio_loss(stub, pc / n_c, pr / n_r)
    ours, metrics = PreferenceObjective("orpo", beta=0.25).pair_losses(pc, pr, n_c, n_r)
    # elementwise on the same fp32 inputs (the two batch means: 8 terms): a few ulps, 1e-6 is 8
    assert torch.allclose(ours, -pc / n_c - losses, rtol=1e-6)  # our NLL term: the chosen response's mean NLL
    assert metrics["log_odds_ratio"].mean().item() == pytest.approx(ratio.item(), rel=1e-6)
    assert metrics["log_odds_chosen"].mean().item() == pytest.approx(log_odds.item(), rel=1e-6)
    assert torch.allclose(metrics["rewards/chosen"], chosen_rewards, rtol=1e-6)
    assert torch.allclose(metrics["rewards/rejected"], rejected_rewards, rtol=1e-6)
