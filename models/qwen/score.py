"""A sequence-classification head on the decoder: transformers' Qwen2/Qwen3/Qwen3-MoE/Qwen3-Next
ForSequenceClassification (a reward model is one with num_labels = 1).

    clf = to_sequence_classifier(load("Qwen2.5-0.5B-Instruct"), num_labels=1, seed=0)  # in place
    scores = clf(input_ids)                  # [B, num_labels]: score(final-norm hidden of the last non-pad token)
    save(clf, "out/rm")                      # architectures [Qwen2ForSequenceClassification], score.weight
    clf = load("out/rm")                     # a folder so written (or by transformers) loads as this class

The head is `score`, a Linear hidden -> num_labels without bias, applied to the final-norm hidden
state of each row's last token that is not `config.pad_token_id`: the rightmost such token,
whatever the padding side (transformers' GenericForSequenceClassification: argmax over
position x (id != pad)); with no pad id a batch of one row takes its last token, and more rows are
an error, as there. Module and tensor names are transformers' (`model.*`, `score.weight`; no
lm_head), so the state dict is the checkpoint. The head is initialised as transformers
initialises it (normal(0, initializer_range)), from a seeded generator.
"""

from __future__ import annotations

from typing import Optional

import torch

from .config import QwenConfig
from .linear import Linear
from .model import Qwen

SUFFIX = "ForSequenceClassification"


def is_sequence_classifier(raw_config: dict) -> bool:
    """Whether a config.json dict names a ...ForSequenceClassification architecture."""
    return any(isinstance(a, str) and a.endswith(SUFFIX) for a in raw_config.get("architectures") or [])


def num_labels_of(config: QwenConfig) -> int:
    """num_labels of a config (config.json's id2label, as transformers derives it; default 1)."""
    id2label = config.extra.get("id2label")
    if isinstance(id2label, dict) and id2label:
        return len(id2label)
    n = config.extra.get("num_labels", 1)
    return int(n) if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1


def _set_labels(config: QwenConfig, num_labels: int) -> None:
    config.extra.pop("num_labels", None)
    id2label = config.extra.get("id2label")
    if not (isinstance(id2label, dict) and len(id2label) == num_labels):
        config.extra["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
        config.extra["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}


def last_token_index(input_ids: torch.Tensor, pad_token_id: Optional[int]) -> torch.Tensor:
    """[B] index of each row's rightmost token != pad_token_id (transformers' rule; 0 for an
    all-pad row). No pad id: the last position, for one row only."""
    B, T = input_ids.shape
    if pad_token_id is None:
        if B != 1:
            raise ValueError("a batch of more than one row needs config.pad_token_id to find each row's last token")
        return torch.full((1,), T - 1, dtype=torch.long, device=input_ids.device)
    non_pad = (input_ids != pad_token_id).to(torch.int32)
    positions = torch.arange(T, device=input_ids.device, dtype=torch.int32)
    return (positions * non_pad).argmax(-1).long()


class QwenForSequenceClassification(Qwen):
    """The decoder (`model`) and a `score` head; forward(input_ids) -> [B, num_labels]."""

    peft_task_type = "SEQ_CLS"   # what an adapter of this model says it is (adapter_config.json task_type)

    def __init__(self, config: QwenConfig, num_labels: Optional[int] = None):
        super().__init__(config)
        del self.lm_head
        n = num_labels or num_labels_of(config)
        _set_labels(config, n)
        self.score = Linear(config.hidden_size, n, bias=False, device=self.model.norm.weight.device)
        if not self.score.weight.is_meta:
            self.init_score()

    # Qwen's tie/head machinery does not apply: there is no lm_head.
    def tie_weights(self) -> None:
        return None

    @property
    def is_tied(self) -> bool:
        return False

    @property
    def num_labels(self) -> int:
        return self.score.out_features if hasattr(self.score, "out_features") else self.score.weight.shape[0]

    @torch.no_grad()
    def init_score(self, seed: int = 0) -> None:
        """score.weight ~ normal(0, initializer_range) (transformers' _init_weights), from a seeded generator."""
        std = float(self.config.extra.get("initializer_range", 0.02))
        w = self.score.weight
        g = torch.Generator(device="cpu").manual_seed(seed)
        w.copy_(torch.randn(w.shape, generator=g, dtype=torch.float32).mul_(std).to(w.dtype))

    def forward(self, input_ids: torch.Tensor, labels=None, *, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, **unused) -> torch.Tensor:
        """input_ids [B, T] -> scores [B, num_labels] (in the head's compute dtype)."""
        if labels is not None:
            raise ValueError("a sequence classifier takes no labels: score rows with model(ids) and apply the loss outside")
        if unused:
            raise TypeError(f"unexpected arguments {sorted(unused)}")
        hidden = self.hidden_states(input_ids, attention_mask=attention_mask, position_ids=position_ids)
        idx = last_token_index(input_ids, self.config.pad_token_id)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
        return self.score(pooled)

    def hf_config(self, hf: dict) -> dict:
        """config.json of a causal LM of the same family -> that of its ForSequenceClassification."""
        arch = self.config.family.sequence_classification
        if not arch:
            raise ValueError(f"transformers has no sequence-classification class for model_type "
                             f"{self.config.model_type!r}")
        hf = dict(hf)
        hf["architectures"] = [arch]
        return hf


def to_sequence_classifier(model: Qwen, num_labels: int = 1, seed: int = 0) -> QwenForSequenceClassification:
    """Turn a loaded causal LM into a sequence classifier in place: drop lm_head, add a fresh `score`
    (normal(0, initializer_range) from `seed`, in the embedding's dtype and device); returns it."""
    if isinstance(model, QwenForSequenceClassification):
        return model
    if not model.config.family.sequence_classification:
        raise ValueError(f"model_type {model.config.model_type!r} has no sequence-classification head in "
                         "transformers (supported: Qwen2, Qwen3, Qwen3-MoE, Qwen3-Next)")
    emb = model.model.embed_tokens.weight
    model.__class__ = QwenForSequenceClassification
    del model.lm_head
    _set_labels(model.config, num_labels)
    model.score = Linear(model.config.hidden_size, num_labels, bias=False, device=emb.device, dtype=emb.dtype)
    model.init_score(seed)
    model.score.weight.requires_grad_(True)
    return model
