"""examples/generate.py as a user runs it (subprocesses): the no-argument default follows the
pipeline to its latest stage, --compare prints each answer once, a closed pipe ends quietly,
an empty prompt generates (issue 30, items 6, 8 and 10)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.examples.conftest import EXAMPLES, ROOT, run_script
from tests.examples.test_evaluate import QWEN_VOCAB, _peft_adapter
from tests.helpers import child_threads, hf_model, save_hf_model

SHORT = ("--max-new-tokens", "3")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A working directory holding runs/cpt-merged, runs/sft/merged and runs/dpo/{merged,adapter}
    (distinct random models; the DPO adapter sits on runs/sft/merged as dpo.py leaves it)."""
    pytest.importorskip("peft")
    work = tmp_path_factory.mktemp("gen-runs")
    for seed, where in enumerate(("cpt-merged", "sft/merged", "dpo/merged")):
        save_hf_model(hf_model("qwen2", seed=seed, **QWEN_VOCAB), work / "runs" / where)
    _peft_adapter(1, work / "runs" / "dpo" / "adapter", work / "runs" / "sft" / "merged")
    return work


def test_no_arguments_take_the_latest_stage(runs):
    proc = run_script("generate.py", "--prompt", "hi", *SHORT, cwd=runs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no --model: the latest stage's output, dpo (runs/dpo/merged)" in proc.stdout
    assert "model: runs/dpo/merged " in proc.stdout


def test_compare_uses_the_latest_adapter_and_prints_each_answer_once(runs):
    proc = run_script("generate.py", "--compare", "--prompt", "hi", "--prompt", "ho", *SHORT, cwd=runs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dpo (runs/dpo/adapter)" in proc.stdout and "model: runs/sft/merged + adapter runs/dpo/adapter" in proc.stdout
    # One side-by-side table per prompt and no streamed copy of the answers before it.
    assert proc.stdout.count("| tuned") == 2
    assert "[base]" not in proc.stdout and "[tuned]" not in proc.stdout


@pytest.mark.parametrize("mode", ["chat", "completion"])
def test_empty_prompt_generates(runs, mode):
    """Chat: an empty user message is a valid conversation. Completion: Qwen has no BOS, so the
    empty context starts a new document (after <|endoftext|>)."""
    proc = run_script("generate.py", "--model", "runs/sft/merged", "--prompt", "", "--mode", mode, *SHORT, cwd=runs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "[model]" in proc.stdout


def test_a_closed_pipe_ends_quietly(runs):
    """`generate.py | head -3`: the reader goes away; the script stops with no message and the
    status a shell gives a tool killed by SIGPIPE (141), not `failed: Broken pipe` (1)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=child_threads(), PYTHONUNBUFFERED="1")
    prompts = [a for i in range(20) for a in ("--prompt", f"question {i}")]
    proc = subprocess.Popen([sys.executable, str(EXAMPLES / "generate.py"), "--model", "runs/sft/merged",
                             "--max-new-tokens", "16", *prompts], cwd=runs, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = [proc.stdout.readline() for _ in range(3)]
    proc.stdout.close()   # what head does after its third line
    stderr = proc.stderr.read()
    assert proc.wait(timeout=300) == 141, stderr
    assert all(lines) and stderr.strip() == "", stderr
