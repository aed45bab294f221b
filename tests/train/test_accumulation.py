"""Token-normalised accumulation and activation checkpointing, against transformers' Qwen2.

Reference: a transformers Qwen2ForCausalLM with the same weights, one forward of the whole
padded batch of 8 with HF's loss (mean over every label != -100 of the batch), backward.

Accumulated micro-batches sum in another order than one big batch, so the bound is measured:
transformers' fp32 gradients against its float64 twin's on the same batch give the floor, and
ours may be tests.helpers.FLOOR_FACTOR floors from its fp32 ones (assert_grads_close).
"""

import copy

import pytest
import torch

import lora
from models.qwen import load
from tests.helpers import assert_close_to_reference, assert_grads_close, float64_twin, hf_model, max_rel_err, save_hf_model
from data import pad_collate
from train import Trainer, TrainConfig, activation_bytes

VOCAB = 320


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(our Qwen, HF Qwen2) with identical random fp32 weights."""
    ref = hf_model("qwen2", seed=3)
    path = save_hf_model(ref, tmp_path_factory.mktemp("tiny") / "m")
    return path, ref


def examples(n=8, seed=0):
    """Varied lengths (5..29 tokens) and varied prompt masks, as in SFT."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 5 + (i * 7) % 25
        ids = torch.randint(0, VOCAB, (length,), generator=g)
        labels = ids.clone()
        labels[: (i * 3) % (length - 2)] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def trainer_for(model, tmp_path, **kw):
    cfg = TrainConfig(out_dir=str(tmp_path), dtype="fp32", max_steps=1, progress=False, grad_checkpointing=False,
                      **{"mode": "full", "batch_size": 1, "grad_accum": 8, **kw})
    return Trainer(model, cfg, examples(), collate_fn=lambda ex: pad_collate(ex, pad_id=0))


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def hf_reference(ref, exs):
    """transformers' fp32 model and its float64 twin, each after one backward of HF's loss on the
    whole padded batch: (ref32, ref64, loss32, loss64)."""
    batch = pad_collate(exs, pad_id=0)
    models = copy.deepcopy(ref).float(), float64_twin(ref)
    losses = []
    for m in models:
        out = m(input_ids=batch["input_ids"], labels=batch["labels"])   # HF: mean over all labels != -100
        out.loss.backward()
        losses.append(out.loss.detach())
    return (*models, *losses)


def hf_reference_grads(ref, exs):
    """transformers' gradients in float64 (the exact function), by parameter name."""
    _, ref64, _, _ = hf_reference(ref, exs)
    return {n: p.grad.detach().clone() for n, p in ref64.named_parameters()}


@pytest.mark.parametrize("split", [(1, 8), (8, 1), (2, 4)], ids=["8x1", "1x8", "4x2"])
def test_accumulated_gradients_equal_one_big_batch(pair, tmp_path, split):
    path, ref = pair
    batch_size, accum = split
    exs = examples()
    ref32, ref64, loss32, loss64 = hf_reference(ref, exs)
    model = load(path, dtype=torch.float32)
    trainer = trainer_for(model, tmp_path, batch_size=batch_size, grad_accum=accum)
    micro = [pad_collate(exs[i : i + batch_size], pad_id=0) for i in range(0, 8, batch_size)]
    result = trainer.accumulate(micro, step=1)
    loss_sum, n_total = result.loss_sum, result.count
    assert result.bad_micro_batch is None
    assert n_total == sum(int((e["labels"][1:] != -100).sum()) for e in exs)
    assert_close_to_reference(torch.tensor(loss_sum / n_total), loss32, loss64, what="loss")
    assert_grads_close(model, ref32, ref64)


def test_mean_of_micro_batch_means_would_differ(pair):
    """The test above can fail: averaging per-micro-batch means is measurably different."""
    path, ref = pair
    exs = examples()
    ref_grads = hf_reference_grads(ref, exs)
    model = load(path, dtype=torch.float32)
    for e in exs:
        b = pad_collate([e], pad_id=0)
        (model(b["input_ids"], labels=b["labels"]) / 8).backward()
    assert max_rel_err(model.model.norm.weight.grad, ref_grads["model.norm.weight"]) > 1e-3


def test_trainer_step_with_batch_8_equals_8_micro_batches(pair, tmp_path):
    """Whole optimizer steps through fit(): same weights after one step, whatever the split."""
    path, _ = pair
    weights = []
    for bs, accum in [(8, 1), (1, 8)]:
        model = load(path, dtype=torch.float32)
        cfg = TrainConfig(out_dir=str(tmp_path / f"{bs}"), dtype="fp32", max_steps=1, progress=False, mode="full",
                          batch_size=bs, grad_accum=accum, shuffle=False, grad_checkpointing=False, lr=1e-3,
                          eps=1e-2)  # Adam's first step is ~g/|g|: a large eps keeps it well-conditioned
        Trainer(model, cfg, examples(), collate_fn=lambda ex: pad_collate(ex, pad_id=0)).fit()
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for n in weights[0]:  # observed 5.6e-8 (18x margin): eps=1e-2 keeps Adam's step from amplifying it
        assert max_rel_err(weights[1][n], weights[0][n]) <= 1e-6, n


# ---------------------------------------------------------------------- activation checkpointing
def lora_grads(path, checkpointing, order, nf4=False):
    model = load(path, dtype=torch.float32)
    if nf4:
        import quant

        quant.quantize_model(model, skip=("lm_head",))
    torch.manual_seed(0)
    if order == "checkpoint-first":
        model.enable_gradient_checkpointing(checkpointing)
    lora.inject(model, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():   # B starts at zero: give it values so A's gradient is not trivially 0
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(n)))
    if order == "inject-first":
        model.enable_gradient_checkpointing(checkpointing)
    batch = pad_collate(examples(4), pad_id=0)
    model.train()
    loss, n = model(batch["input_ids"], labels=batch["labels"], reduction="sum")
    (loss / n).backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("nf4", [False, True], ids=["lora", "qlora"])
@pytest.mark.parametrize("order", ["inject-first", "checkpoint-first"])
def test_checkpointing_changes_no_lora_gradient_frozen_base(pair, order, nf4):
    path, _ = pair
    plain = lora_grads(path, False, order, nf4)
    ckpt = lora_grads(path, True, order, nf4)
    assert plain.keys() == ckpt.keys() and any("lora_A" in k for k in plain)
    for k in plain:
        assert max_rel_err(ckpt[k], plain[k]) <= 1e-6, k  # observed bit-equal: recomputation reruns the same kernels
        assert plain[k].abs().sum() > 0, k


def test_checkpointing_changes_no_full_gradient_and_cuts_activation_memory(pair, capsys):
    path, ref = pair
    exs = examples()
    ref32, ref64, _, _ = hf_reference(ref, exs)
    batch = pad_collate(exs, pad_id=0)
    saved = {}
    for on in (False, True):
        model = load(path, dtype=torch.float32)
        model.enable_gradient_checkpointing(on)
        model.train()
        loss, n = model(batch["input_ids"], labels=batch["labels"], reduction="sum")
        (loss / n).backward()
        assert_grads_close(model, ref32, ref64)
        long_batch = pad_collate(examples(4, seed=1) * 2, pad_id=0)
        saved[on] = activation_bytes(model, long_batch)
    with capsys.disabled():
        print(f"\n[activation memory] tiny Qwen2 (2 layers, hidden 48), batch {tuple(long_batch['input_ids'].shape)}: "
              f"{saved[False]} B saved for backward without checkpointing, {saved[True]} B with "
              f"({saved[True] / saved[False]:.2f}x)")
    assert saved[True] < 0.6 * saved[False]
