"""Preference objectives: the losses and metrics against the published formulas written plainly
here, the whole objective against transformers + PEFT (policy with the adapter, reference with it
disabled; loss, metrics and adapter gradients), the adapters-off reference over 16-bit and NF4
bases, precomputed == on-the-fly, gradients reach only the adapters, and a short training run
that raises reward accuracy and margin on held-out toy pairs."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import lora
from data.preference import preference_collate
from models.qwen import load
from quant import NF4Quantizer
from tests.helpers import assert_grads_close, float64_twin, max_rel_err, tiny_checkpoint
from train.optim import AdamW, param_groups
from train.preference import LOSSES, PreferenceObjective, precompute_reference_logps

VOCAB = 320
PAD = 0  # the tiny vocabulary has no <|endoftext|>; any id works as padding
TRL_METRICS = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
               "logps/rejected"}


# ---------------------------------------------------------------------- the published formulas
def published(kind, pc, pr, nc, nr, rc=None, rr=None, beta=0.1, eps=0.0, gamma=0.5):
    """(loss, chosen reward, rejected reward, logged chosen logp, logged rejected logp) of one pair,
    from float64 scalar tensors (differentiable, so it also gives the reference gradients).

    DPO (Rafailov et al. 2023, eq. 7) with conservative label smoothing (Mitchell 2023);
    IPO (Azar et al. 2023, eq. 17) on log-ratios averaged over the response tokens (as TRL);
    SimPO (Meng et al. 2024, eq. 6); ORPO (Hong et al. 2024, eqs. 4-7: odds = P / (1 - P), P the
    length-normalised likelihood, L = L_SFT + beta * L_OR).
    """
    def log_sigmoid(x):
        return -torch.log1p(torch.exp(-x))

    if kind in ("sigmoid", "ipo"):
        if kind == "sigmoid":
            z = beta * ((pc - rc) - (pr - rr))
            loss = -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)
        else:
            loss = ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2
        return loss, beta * (pc - rc), beta * (pr - rr), pc, pr
    ac, ar = pc / nc, pr / nr
    if kind == "simpo":
        z = beta * ac - beta * ar - gamma
        loss = -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)
    else:
        def odds(p):
            return p / (1 - p)
        loss = -ac - beta * log_sigmoid(torch.log(odds(torch.exp(ac)) / odds(torch.exp(ar))))
    return loss, beta * ac, beta * ar, ac, ar


CASES = [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("simpo", 0.0), ("simpo", 0.1), ("orpo", 0.0)]


@pytest.mark.parametrize("kind, eps", CASES)
def test_pair_losses_and_metrics_are_the_published_formulas(kind, eps):
    g = torch.Generator().manual_seed(0)
    B = 6
    n_c, n_r = torch.randint(1, 40, (B,), generator=g), torch.randint(1, 40, (B,), generator=g)
    pc, pr = -torch.rand(B, generator=g) * n_c * 3, -torch.rand(B, generator=g) * n_r * 3
    rc, rr = pc + torch.randn(B, generator=g) * 3, pr + torch.randn(B, generator=g) * 3
    objective = PreferenceObjective(kind, beta=0.3, label_smoothing=eps, gamma=0.7)
    losses, metrics = objective.pair_losses(pc, pr, n_c, n_r, *((rc, rr) if kind in ("sigmoid", "ipo") else ()))
    assert TRL_METRICS <= set(metrics)
    for i in range(B):
        ref = [float(x) for x in published(kind, *(t[i].double() for t in (pc, pr, n_c, n_r, rc, rr)),
                                           beta=0.3, eps=eps, gamma=0.7)]
        assert losses[i].item() == pytest.approx(ref[0], rel=1e-5, abs=1e-6)
        assert metrics["rewards/chosen"][i].item() == pytest.approx(ref[1], rel=1e-5, abs=1e-6)
        assert metrics["rewards/rejected"][i].item() == pytest.approx(ref[2], rel=1e-5, abs=1e-6)
        assert metrics["rewards/margins"][i].item() == pytest.approx(ref[1] - ref[2], rel=1e-5, abs=1e-5)
        assert metrics["rewards/accuracies"][i].item() == float(ref[1] > ref[2])
        assert metrics["logps/chosen"][i].item() == pytest.approx(ref[3], rel=1e-5)
        assert metrics["logps/rejected"][i].item() == pytest.approx(ref[4], rel=1e-5)


def test_orpo_log_odds_stay_finite_near_certainty():
    # Average log-probs of -1e-6 (P within 1e-6 of 1) and -30 (P ~ 1e-13): log(1 - P) must
    # neither cancel to -inf nor round to 0. Reference: float64 with expm1.
    objective = PreferenceObjective("orpo", beta=0.1)
    a_c, a_r = [-1e-6, -30.0], [-2.0, -1e-6]
    n = torch.tensor([5, 5])
    _, metrics = objective.pair_losses(torch.tensor(a_c) * 5, torch.tensor(a_r) * 5, n, n)

    def log_odds(a):
        return a - math.log(-math.expm1(a))

    for i in range(2):
        expected = log_odds(a_c[i]) - log_odds(a_r[i])
        assert metrics["log_odds_chosen"][i].item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(loss="kto"), "expected one of"),
    (dict(loss="simpo", reference="adapters"), "reference-free"),
    (dict(loss="sigmoid", reference=None), "needs a reference"),
    (dict(loss="sigmoid", beta=0.0), "beta"),
    (dict(loss="sigmoid", label_smoothing=0.5), r"\[0, 0.5\)"),
    (dict(loss="ipo", label_smoothing=0.1), "sigmoid and simpo"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PreferenceObjective(**kwargs)


# ---------------------------------------------------------------------- on tiny models
def synthetic_items(n: int, seed: int, chosen_tokens=None, rejected_tokens=None):
    """n pairs of random ids: a prompt of 3-9 tokens, responses of 2-7 (drawn from the given token sets)."""
    g = torch.Generator().manual_seed(seed)
    items = []

    def draw(k, pool):
        if pool is None:
            return torch.randint(0, VOCAB, (k,), generator=g)
        return pool[torch.randint(0, len(pool), (k,), generator=g)]

    for _ in range(n):
        p, c, r = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((3, 10), (2, 8), (2, 8)))
        prompt = draw(p, None)
        chosen, rejected = draw(c, chosen_tokens), draw(r, rejected_tokens)
        unscored = torch.full((p,), -100)
        items.append({"chosen_input_ids": torch.cat([prompt, chosen]), "chosen_labels": torch.cat([unscored, chosen]),
                      "rejected_input_ids": torch.cat([prompt, rejected]),
                      "rejected_labels": torch.cat([unscored, rejected])})
    return items


def collate(items):
    return preference_collate(items, pad_id=PAD)


def gathered_logps(logits, labels):
    logits = logits if logits.dtype == torch.float64 else logits.float()   # (a float64 twin stays float64)
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    targets = labels[:, 1:]
    keep = targets != -100
    return (logp.gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1) * keep).sum(1), keep.sum(1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("pref") / "tiny", tie_word_embeddings=False, seed=3)[0]


def with_adapters(path, quantize=None, seed=0):
    from tests.lora.conftest import randomise_adapters

    model = load(path, dtype=torch.float32, quantize=quantize)
    lora.inject(model, r=4, alpha=8)
    randomise_adapters(model, seed=seed, std=0.1)
    return model


@pytest.mark.parametrize("kind", LOSSES)
def test_objective_matches_transformers_and_peft(ckpt, tmp_path, kind):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = with_adapters(ckpt)
    lora.save(model, tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32),
                                               str(tmp_path / "adapter"), is_trainable=True)
    batch = collate(synthetic_items(3, seed=1))
    objective = PreferenceObjective(kind, beta=0.5)
    assert objective.count(batch) == 3
    loss_sum, metrics = objective(model, batch)
    loss_sum.backward()
    # The reference computation: transformers' logits, log_softmax + gather, the plain formulas,
    # on PEFT's model and on its float64 twin (the floor of the loss and of every gradient).
    twin = float64_twin(peft_model)
    (expected, ref_metrics), _ = (_published_objective(m, batch, kind) for m in (peft_model, twin))
    # observed 4e-7 (25x margin). Not the scalar's own float64 floor: that one number's error
    # is a single sample, often under one ulp, and 8 of it was within 2.4x of the observed value.
    assert loss_sum.item() == pytest.approx(expected.item(), rel=1e-5)
    for key, value in ref_metrics.items():
        assert metrics[key].item() == pytest.approx(value, rel=1e-5, abs=1e-6), key
    peft_names = {n.replace("base_model.model.", "").replace(".default", ""): n
                  for n, p in peft_model.named_parameters() if p.requires_grad}
    assert set(peft_names) == {n for n, p in model.named_parameters() if p.requires_grad} and len(peft_names) == 28
    assert_grads_close(model, peft_model, twin, lambda m, name: m.get_parameter(peft_names[name]).grad)


def _published_objective(peft_model, batch, kind, B=3):
    """The published formula's summed loss on `peft_model` (after its backward) and its metrics."""
    pi, n = gathered_logps(peft_model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"])
    with torch.no_grad(), peft_model.disable_adapter():
        rho, _ = gathered_logps(peft_model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                batch["labels"])
    ref_losses, ref_metrics = [], {k: 0.0 for k in ("rewards/chosen", "rewards/rejected", "logps/chosen")}
    for i in range(B):
        out = published(kind, *(t.double() for t in (pi[i], pi[B + i], n[i], n[B + i], rho[i], rho[B + i])), beta=0.5)
        ref_losses.append(out[0])
        for key, value in zip(("rewards/chosen", "rewards/rejected", "logps/chosen"), (out[1], out[2], out[3])):
            ref_metrics[key] += float(value.detach())
    expected = sum(ref_losses)
    expected.backward()
    return expected.detach(), ref_metrics


def test_reference_is_the_base_model_and_gradients_reach_only_the_adapters(ckpt):
    from transformers import AutoModelForCausalLM

    model = with_adapters(ckpt)
    batch = collate(synthetic_items(4, seed=2))
    objective = PreferenceObjective("sigmoid")
    rho_c, rho_r = objective.reference_logps(model, batch)
    base = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    with torch.no_grad():
        expected, _ = gathered_logps(base(batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                     batch["labels"])
    # observed 4.6e-8 (200x margin)
    assert max_rel_err(torch.cat([rho_c, rho_r]), expected) <= 1e-5
    assert all(m.adapters_enabled for m in lora.adapter_modules(model).values())  # restored afterwards
    loss_sum, _ = objective(model, batch)
    loss_sum.backward()
    lora.check_gradients(model)  # every adapter parameter got a gradient
    for name, p in model.named_parameters():
        assert (p.grad is not None) == ("lora_" in name), name


def test_reference_over_an_nf4_base(ckpt):
    pytest.importorskip("bitsandbytes")
    model = with_adapters(ckpt, quantize=NF4Quantizer())
    base = load(ckpt, dtype=torch.float32, quantize=NF4Quantizer())  # the same 4-bit base without adapters
    batch = collate(synthetic_items(3, seed=3))
    objective = PreferenceObjective("ipo")
    rho_c, rho_r = objective.reference_logps(model, batch)
    with torch.no_grad():
        nll, _ = base(batch["input_ids"], labels=batch["labels"], attention_mask=batch["attention_mask"],
                      reduction="none")
        adapted, _ = model(batch["input_ids"], labels=batch["labels"], attention_mask=batch["attention_mask"],
                           reduction="none")
    assert torch.equal(torch.cat([rho_c, rho_r]), -nll)
    assert max_rel_err(adapted, nll) > 1e-3  # the adapters are not a no-op
    loss_sum, _ = objective(model, batch)
    loss_sum.backward()
    assert all((p.grad is not None) == ("lora_" in n) for n, p in model.named_parameters())


@pytest.mark.parametrize("kind", ["sigmoid", "ipo"])
def test_precomputed_reference_equals_on_the_fly(ckpt, kind):
    model = with_adapters(ckpt)
    items = synthetic_items(5, seed=4)
    with_ref = precompute_reference_logps(model, items, batch_size=2, collate_fn=collate)  # other batches and padding
    assert len(with_ref) == 5 and set(with_ref[0]) >= {"ref_chosen_logps", "ref_rejected_logps"}
    on_the_fly, precomputed = PreferenceObjective(kind), PreferenceObjective(kind, reference="precomputed")
    batch = collate([with_ref[i] for i in (4, 0, 2)])
    plain = collate([items[i] for i in (4, 0, 2)])
    loss_a, metrics_a = on_the_fly(model, plain)
    loss_a.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    loss_b, metrics_b = precomputed(model, batch)
    loss_b.backward()
    assert loss_b.item() == pytest.approx(loss_a.item(), rel=1e-5, abs=1e-7)
    for key in metrics_a:
        assert metrics_b[key].item() == pytest.approx(metrics_a[key].item(), rel=1e-5, abs=1e-6), key
    for name, p in model.named_parameters():
        if p.grad is not None:
            # observed at most 9.3e-7 (100x margin): one process, another split of the same batch
            assert max_rel_err(p.grad, grads[name]) <= 1e-4, name
    with pytest.raises(ValueError, match="precompute_reference_logps"):
        precomputed(model, plain)
    # With the adapter on, the reference is the policy as it stands: every reward is 0.
    start = precompute_reference_logps(model, items, collate_fn=collate, disable_adapters=False)
    with torch.no_grad():
        loss, metrics = precomputed(model, collate([start[i] for i in range(5)]))
    assert metrics["rewards/chosen"].abs().max() < 1e-6 and metrics["rewards/margins"].abs().max() < 1e-6
    if kind == "sigmoid":
        assert loss.item() == pytest.approx(5 * math.log(2), rel=1e-6)


@pytest.mark.parametrize("kind", ["sigmoid", "orpo"])
def test_micro_batch_split_changes_nothing(ckpt, kind):
    """The Objective protocol: summed losses and metrics over micro-batches, divided by the step's
    pairs, equal those of one batch of all the pairs (other padding, same numbers)."""
    model = with_adapters(ckpt)
    items = synthetic_items(4, seed=6)
    objective = PreferenceObjective(kind)
    whole = collate(items)
    loss, metrics = objective(model, whole)
    (loss / objective.count(whole)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    parts = [collate(items[:1]), collate(items[1:])]
    n_pairs = sum(objective.count(b) for b in parts)
    split_loss, split_metrics = 0.0, {}
    for batch in parts:
        part_loss, part_metrics = objective(model, batch)
        (part_loss / n_pairs).backward()
        split_loss += part_loss.item()
        for k, v in part_metrics.items():
            split_metrics[k] = split_metrics.get(k, 0.0) + v.item()
    assert n_pairs == 4 and split_loss == pytest.approx(loss.item(), rel=1e-5)
    assert split_metrics == pytest.approx({k: v.item() for k, v in metrics.items()}, rel=1e-5, abs=1e-6)
    for name, p in model.named_parameters():
        if p.grad is not None:
            # observed at most 9.3e-7 (100x margin): one process, another split of the same batch
            assert max_rel_err(p.grad, grads[name]) <= 1e-4, name


def test_refusals(ckpt):
    batch = collate(synthetic_items(2, seed=5))
    base = load(ckpt, dtype=torch.float32)
    with pytest.raises(ValueError, match="needs a model with LoRA adapters"):
        PreferenceObjective("sigmoid")(base, batch)
    odd = {k: v[:3] for k, v in batch.items()}
    with pytest.raises(ValueError, match="even number of rows"):
        PreferenceObjective("simpo").count(odd)
    empty = dict(batch, labels=batch["labels"].clone())
    empty["labels"][3] = -100
    with pytest.raises(ValueError, match="row 3 \\(rejected of pair 1\\) has no labelled token"):
        PreferenceObjective("simpo")(base, empty)


@pytest.mark.parametrize("kind", ["sigmoid", "simpo"])
def test_a_short_run_raises_held_out_reward_accuracy_and_margin(ckpt, kind):
    """Toy preference: chosen answers use tokens 10-29, rejected ones tokens 200-219. A few AdamW
    steps on LoRA through the Objective protocol (2 micro-batches, normalised by the step's pairs)
    must make held-out pairs (new prompts, new answers) score the chosen answer higher."""
    torch.manual_seed(0)
    model = load(ckpt, dtype=torch.float32)
    lora.inject(model, r=8, alpha=16)
    good, bad = torch.arange(10, 30), torch.arange(200, 220)
    train_items = synthetic_items(16, seed=10, chosen_tokens=good, rejected_tokens=bad)
    held_out = collate(synthetic_items(16, seed=11, chosen_tokens=good, rejected_tokens=bad))
    objective = PreferenceObjective(kind, beta=0.1 if kind == "sigmoid" else 2.0)

    def evaluate():
        with torch.no_grad():
            _, metrics = objective(model, held_out)
        return {k: v.item() / objective.count(held_out) for k, v in metrics.items()}

    before = evaluate()
    optimizer = AdamW(param_groups(model, weight_decay=0.0), lr=1e-3)
    for step in range(12):
        micro = [collate(train_items[i : i + 4]) for i in range((step % 2) * 8, (step % 2) * 8 + 8, 4)]
        n_pairs = sum(objective.count(b) for b in micro)
        for batch in micro:
            loss_sum, _ = objective(model, batch)
            (loss_sum / n_pairs).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    after = evaluate()
    assert after["rewards/accuracies"] >= 0.9 > before["rewards/accuracies"]
    assert after["rewards/margins"] > before["rewards/margins"] + 0.05
    assert after["logps/chosen"] - after["logps/rejected"] > before["logps/chosen"] - before["logps/rejected"]
