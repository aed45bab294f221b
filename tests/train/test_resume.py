"""Exact resume across real process deaths: SIGKILL at a step boundary and mid-accumulation,
SIGTERM (clean save and exit), and a crash while a checkpoint is being written.

The run that dies is a child process (tests/train/run_tiny.py) killed by a real SIGKILL or
ended by os._exit mid-save. The reference (the same run never interrupted) and the resumed
run execute in this process, single-threaded like the child, which keeps the test fast; the
losses (metrics.jsonl) and final trainable weights must be bit-identical."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train

SCRIPT = Path(__file__).with_name("run_tiny.py")
N = 6           # steps; checkpoints every 3 -> the kill comes after step-3 was written
ACCUM = 3


sys.path.insert(0, str(SCRIPT.parent))
import run_tiny  # noqa: E402


def run_here(out: Path, **opts) -> dict:
    """The same run as `run`, in this process; returns fit()'s summary."""
    opts = {"out_dir": str(out), "max_steps": N, "grad_accum": ACCUM, "save_every": 3, **opts}
    return run_tiny.build(opts).fit()


def run(out: Path, **opts) -> subprocess.CompletedProcess:
    opts = {"out_dir": str(out), "max_steps": N, "grad_accum": ACCUM, "save_every": 3, **opts}
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(SCRIPT), json.dumps(opts)], capture_output=True, text=True,
                          env=env, timeout=120)


def losses(out: Path) -> list:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def final_weights(out: Path) -> dict:
    return load_file(str(out / "checkpoints" / f"step-{N}" / "trainable.safetensors"))


def assert_same_run(a: Path, b: Path) -> None:
    assert losses(a) == losses(b)
    assert [s for s, _ in losses(a)] == list(range(1, N + 1))
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys() and len(wa) > 0
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    # and the adapter written at the end, in PEFT format, too
    pa, pb = load_file(str(a / "adapter" / "adapter_model.safetensors")), load_file(str(b / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def kinds():
    out = ["lora"]
    try:
        import quant
        has = hasattr(quant, "quantize_model")
    except ImportError:
        has = False
    out.append(pytest.param("qlora", marks=pytest.mark.skipif(not has, reason="quant.quantize_model not available yet")))
    return out


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """The uninterrupted run per kind, computed once."""
    cache = {}

    def get(kind):
        if kind not in cache:
            out = tmp_path_factory.mktemp(f"ref-{kind}")
            assert run_here(out, kind=kind)["steps"] == N
            cache[kind] = out
        return cache[kind]
    return get


@pytest.mark.parametrize("kind", kinds())
@pytest.mark.parametrize("kill_at", [[4, 0], [5, 1]], ids=["step-boundary", "mid-accumulation"])
def test_sigkill_then_resume_is_bit_identical(tmp_path, references, kind, kill_at):
    ref = references(kind)
    r = run(tmp_path, kind=kind, kill_at=kill_at + ["KILL"])
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert train.newest_checkpoint(tmp_path / "checkpoints").name == "step-3"
    # the killed process logged steps past the checkpoint; resume must drop and redo them
    assert max(s for s, _ in losses(tmp_path)) == kill_at[0] - 1
    assert run_here(tmp_path, kind=kind, resume=True)["resumed_from"].endswith("step-3")
    assert_same_run(ref, tmp_path)


def test_sigterm_saves_and_exits_cleanly_then_resumes(tmp_path, references):
    """In this process (a real SIGTERM to ourselves): the step in flight finishes, is saved, fit returns."""
    ref = references("lora")
    opts = {"out_dir": str(tmp_path), "max_steps": N, "grad_accum": ACCUM, "save_every": 3, "kind": "lora"}
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(train.Interrupted) as e:
        run_tiny.build({**opts, "kill_at": [2, 1, "TERM"]}).fit()
    assert signal.getsignal(signal.SIGTERM) is handler          # the loop's handler is gone again
    assert e.value.signal == "SIGTERM" and e.value.step == 2    # step 2 finished, then saved
    assert e.value.checkpoint == str(tmp_path / "checkpoints" / "step-2")
    assert train.newest_checkpoint(tmp_path / "checkpoints").name == "step-2"
    assert not (tmp_path / "adapter").exists()                  # nothing final from a half-trained run
    summary = run_tiny.build({**opts, "resume": True}).fit()
    assert summary["resumed_from"].endswith("step-2") and summary["steps"] == N
    assert_same_run(ref, tmp_path)


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, references):
    ref = references("lora")
    r = run(tmp_path, kind="lora", crash_in_save_at=6)
    assert r.returncode == 3, r.stderr[-3000:]
    ckpts = tmp_path / "checkpoints"
    leftovers = [p.name for p in ckpts.iterdir() if p.name.startswith(".tmp-")]
    assert leftovers, "the crash should have left a half-written temporary directory"
    assert not (ckpts / "step-6").exists()
    assert train.newest_checkpoint(ckpts).name == "step-3"
    summary = run_here(tmp_path, kind="lora", resume=True)   # the previous checkpoint loads, the run completes
    assert summary["resumed_from"].endswith("step-3")
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".tmp-")]
    assert_same_run(ref, tmp_path)
