"""Checkpoint files: atomic directories, retention (last K + best), RNG capture, resume
validation, warm start, and the full-then-LoRA mode across a stop/resume."""

import json
import os
import random
import signal

import numpy as np
import pytest
import torch

import lora
from models.qwen import Qwen, QwenConfig
from train import (
    Interrupted,
    CheckpointError,
    Trainer,
    TrainConfig,
    atomic_directory,
    best_checkpoint,
    capture_rng_state,
    complete_checkpoints,
    newest_checkpoint,
    restore_rng_state,
)
from train.checkpoint import load_tensors, save_tensors, write_json

VOCAB = 64


def tiny(seed=0, adapters=True) -> Qwen:
    """A tiny model with LoRA r=2 (dropout 0.1) on every linear, unless adapters=False."""
    torch.manual_seed(seed)
    model = Qwen(QwenConfig.preset("tiny", vocab_size=VOCAB))
    if adapters:
        lora.inject(model, r=2, alpha=16, dropout=0.1)
    return model


def data(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (6 + i % 4,), generator=g)} for i in range(n)]


def cfg(out, **kw):
    base = dict(out_dir=str(out), max_steps=6, batch_size=2, grad_accum=2, dtype="fp32", progress=False, lr=1e-2,
                pad_id=0, warmup_steps=1)
    base.update(kw)
    return TrainConfig(**base)


def test_rng_state_roundtrip_restores_every_generator(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1)                      # leaves a cached Gaussian in Python's state
    tensors, meta = capture_rng_state()
    save_tensors(tmp_path / "rng.safetensors", tensors)
    write_json(tmp_path / "rng.json", meta)
    expected = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(load_tensors(tmp_path / "rng.safetensors"), json.loads((tmp_path / "rng.json").read_text()))
    got = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), torch.rand(3))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


def test_atomic_directory_failure_leaves_previous_untouched(tmp_path):
    final = tmp_path / "step-1"
    with atomic_directory(final) as tmp:
        (tmp / "state.json").write_text("{}")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_directory(final) as tmp:
            (tmp / "state.json").write_text('{"new": 1}')
            raise RuntimeError("disk full")
    assert (final / "state.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["step-1"]
    # a directory without state.json (however it got there) never counts as complete
    (tmp_path / "step-7").mkdir()
    assert newest_checkpoint(tmp_path).name == "step-1"


def test_keep_last_k_and_best_by_validation_loss(tmp_path):
    model = tiny()
    trainer = Trainer(model, cfg(tmp_path, max_steps=8, save_every=1, eval_every=1, keep_last=2), data(),
                      eval_dataset=data(4, seed=1))
    # make step 3 the best evaluation whatever the curve does
    real = trainer.evaluate

    def evaluate():
        r = real()
        return {**r, "loss": 0.01} if trainer.step == 3 else r
    trainer.evaluate = evaluate
    trainer.fit()
    names = [p.name for p in complete_checkpoints(tmp_path / "checkpoints")]
    assert names == ["step-3", "step-7", "step-8"]
    assert best_checkpoint(tmp_path / "checkpoints").name == "step-3"
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert len(train_rows) == 8 and {"step", "loss", "lr", "grad_norm", "tokens_per_s", "peak_mem"} <= set(train_rows[0])
    assert len([r for r in rows if "val_loss" in r]) == 8
    files = {p.name for p in (tmp_path / "checkpoints" / "step-8").iterdir()}
    assert files == {"trainable.safetensors", "adapter", "optimizer.safetensors", "optimizer.json", "rng.safetensors",
                     "rng.json", "state.json"}
    state = json.loads((tmp_path / "checkpoints" / "step-8" / "state.json").read_text())
    assert state["step"] == 8 and state["micro_step"] == 16 and state["sampler"]["epoch"] == 3
    assert json.loads((tmp_path / "checkpoints" / "step-8" / "adapter" / "adapter_config.json").read_text())["r"] == 2
    # the PEFT adapter of the checkpoint loads into a fresh model and equals the trained one
    fresh = tiny()
    lora.load(fresh, tmp_path / "checkpoints" / "step-8" / "adapter")
    assert all(torch.equal(a, b) for a, b in zip(lora.adapter_state_dict(fresh).values(),
                                                  lora.adapter_state_dict(model).values()))


def test_resume_refuses_a_changed_batch_layout(tmp_path):
    Trainer(tiny(), cfg(tmp_path, save_every=2), data()).fit()
    with pytest.raises(CheckpointError, match=r"written with grad_accum=2, this run has grad_accum=1"):
        Trainer(tiny(), cfg(tmp_path, grad_accum=1, resume=True), data()).fit()


def test_resume_with_no_checkpoint_starts_fresh(tmp_path):
    summary = Trainer(tiny(), cfg(tmp_path, resume=True, max_steps=2), data()).fit()
    assert summary["resumed_from"] is None and summary["steps"] == 2


def test_warm_start_loads_weights_only(tmp_path):
    first = tiny()
    Trainer(first, cfg(tmp_path / "a", max_steps=3), data()).fit()
    trained = {k: v.clone() for k, v in lora.trainable_state_dict(first).items()}
    model = tiny()
    trainer = Trainer(model, cfg(tmp_path / "b", max_steps=2, warm_start=str(tmp_path / "a" / "checkpoints" / "step-3")),
                      data())
    seen = {}
    trainer.on_micro_batch = lambda step, m: seen.setdefault(step, (
        {k: v.clone() for k, v in lora.trainable_state_dict(model).items()}, len(trainer.optimizer.state)))
    trainer.fit()
    weights, n_state = seen[1]
    assert n_state == 0                                   # fresh optimizer
    assert all(torch.equal(weights[k], trained[k]) for k in trained)
    assert json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[0])["lr"] == pytest.approx(1e-2 / 2)
    # an adapter directory works too
    Trainer(tiny(), cfg(tmp_path / "c", max_steps=1, warm_start=str(tmp_path / "a" / "adapter")), data()).fit()
    with pytest.raises(CheckpointError, match="warm_start"):
        Trainer(tiny(), cfg(tmp_path / "d", max_steps=1, warm_start=str(tmp_path)), data()).fit()


def test_full_then_lora_switches_and_resumes_exactly(tmp_path):
    def run(out, stop_at=None, resume=False):
        model = tiny(adapters=False)
        settings = lora.LoRAConfig(r=2, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
        trainer = Trainer(model, cfg(out, mode="full-then-lora", full_fraction=0.5, max_steps=6, resume=resume),
                          data(), lora_config=settings)
        if stop_at:
            def hook(step, m):
                if step == stop_at and m == 0:
                    os.kill(os.getpid(), signal.SIGTERM)
            trainer.on_micro_batch = hook
        try:
            summary = trainer.fit()
        except Interrupted as e:
            summary = {"interrupted": e.signal, "steps": e.step}
        return model, summary

    ref_model, ref = run(tmp_path / "ref")
    assert ref["steps"] == 6
    rows = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["full"] * 3 + ["lora"] * 3
    assert (tmp_path / "ref" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "ref" / "model" / "model.safetensors").is_file()

    _, first = run(tmp_path / "cut", stop_at=5)           # stops after step 5, in the LoRA phase
    assert first["interrupted"] == "SIGTERM" and first["steps"] == 5
    model, second = run(tmp_path / "cut", resume=True)
    assert second["resumed_from"].endswith("step-5")
    ref_rows = [r["loss"] for r in rows]
    got = [json.loads(x)["loss"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert got == ref_rows
    for (n, a), (_, b) in zip(ref_model.named_parameters(), model.named_parameters()):
        assert torch.equal(a, b), n
