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
    # the schedule restarts: the first update is warm-up step 0, at lr 0 (HF's warm-up), not step 4's lr
    assert json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[0])["lr"] == 0.0
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


# ---------------------------------------------------------------------- faults and tampering
def _trained(out, steps=4):
    Trainer(tiny(), cfg(out, max_steps=steps, save_every=2, keep_last=3), data()).fit()
    return out / "checkpoints" / f"step-{steps}"


def _restamp(step_dir):
    """Record the files' current sizes in state.json, as a deliberate tamperer would (so the deep
    checks, not the size list, have to find the damage)."""
    from train.checkpoint.store import file_sizes

    state = json.loads((step_dir / "state.json").read_text())
    sizes = file_sizes(step_dir)
    sizes.pop("state.json")
    state["files"] = sizes
    (step_dir / "state.json").write_text(json.dumps(state))


def _tamper_sampler(d):
    state = json.loads((d / "state.json").read_text())
    state["sampler"]["position"] = 10_000
    (d / "state.json").write_text(json.dumps(state))
    return r"state\.json: key 'sampler': epoch \d+, position 10000: outside the data"


def _tamper_step(d):
    state = json.loads((d / "state.json").read_text())
    del state["step"]
    (d / "state.json").write_text(json.dumps(state))
    return r"state\.json: missing key 'step'"


def _tamper_optimizer_shape(d):
    t = load_tensors(d / "optimizer.safetensors")
    key = sorted(k for k in t if k.endswith("exp_avg"))[0]
    t[key] = t[key][..., :1].contiguous()
    save_tensors(d / "optimizer.safetensors", t)
    _restamp(d)
    return rf"optimizer\.safetensors: tensor '{key}' has shape"


def _tamper_optimizer_missing(d):
    t = load_tensors(d / "optimizer.safetensors")
    key = sorted(k for k in t if k.endswith("exp_avg_sq"))[-1]
    del t[key]
    save_tensors(d / "optimizer.safetensors", t)
    _restamp(d)
    return rf"optimizer\.safetensors: missing tensor '{key}'"


def _tamper_rng(d):
    t = load_tensors(d / "rng.safetensors")
    t["torch_cpu"] = t["torch_cpu"][:100].contiguous()
    save_tensors(d / "rng.safetensors", t)
    _restamp(d)
    return r"rng\.\*: bad RNG state"


def _tamper_weights(d):
    t = load_tensors(d / "trainable.safetensors")
    key = sorted(t)[0]
    t[key][0] = float("nan")
    save_tensors(d / "trainable.safetensors", t)
    return rf"trainable\.safetensors: '{key}' holds NaN or Inf"


def _tamper_size(d):
    (d / "optimizer.json").write_text((d / "optimizer.json").read_text() + " ")
    return r"checkpoint step-4 is damaged: .*optimizer\.json: \d+ bytes, state\.json recorded \d+.*delete .*step-4 to resume from step-2"


@pytest.mark.parametrize("tamper", [_tamper_sampler, _tamper_step, _tamper_optimizer_shape, _tamper_optimizer_missing,
                                    _tamper_rng, _tamper_weights, _tamper_size],
                         ids=lambda f: f.__name__[8:])
def test_a_tampered_checkpoint_is_one_error_naming_file_and_key(tmp_path, tamper):
    """Never a KeyError/RuntimeError from deep inside, never a silent different continuation."""
    step_dir = _trained(tmp_path)
    needle = tamper(step_dir)
    with pytest.raises(CheckpointError, match=needle):
        Trainer(tiny(), cfg(tmp_path, max_steps=4, save_every=2, keep_last=3, resume=True), data()).fit()
    assert step_dir.is_dir()   # nothing deleted


def test_no_sequence_of_crashes_loses_the_newest_checkpoint(tmp_path):
    """The crash windows of a re-save of step-N (atomic_directory: step-N moved to .old-*, then the
    new one moved in) and of pruning (.del-*), and a half-deleted old step dir: resume finds the
    newest complete checkpoint, and everything left over is cleaned up on start."""
    newest = _trained(tmp_path, steps=6)
    root = newest.parent
    expected = json.loads((newest / "state.json").read_text())["step"]
    os.replace(newest, root / f".old-{newest.name}-999")      # crash between the two renames ...
    (root / f".tmp-{newest.name}-999").mkdir()                 # ... with a half-written replacement
    (root / ".del-step-0-999").mkdir()                         # an interrupted prune
    half = root / "step-1"
    half.mkdir()                                               # an older half-deleted step dir
    (half / "state.json").write_text(json.dumps({"step": 1, "files": {"trainable.safetensors": 10}}))
    trainer = Trainer(tiny(), cfg(tmp_path, max_steps=6, save_every=2, keep_last=3, resume=True), data())
    lines = []
    trainer.say = lines.append
    trainer.fit()
    assert trainer.resumed_from == str(newest) and expected == 6
    assert any("resume: continuing from" in line and "step-6" in line for line in lines)
    left = sorted(p.name for p in root.iterdir())
    assert left == ["step-2", "step-4", "step-6"], left


def test_resume_without_a_checkpoint_says_so(tmp_path):
    trainer = Trainer(tiny(), cfg(tmp_path, max_steps=1, resume=True), data())
    lines = []
    trainer.say = lines.append
    trainer.fit()
    assert lines == [f"resume: no complete checkpoint in {tmp_path / 'checkpoints'}; starting from step 0"]
