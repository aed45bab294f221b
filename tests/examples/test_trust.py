"""The guarantees of README "Trustworthy runs", tested the way users and attackers meet them:
scripts in subprocesses, the same command twice, a terminal or none, Ctrl-C and SIGTERM at a
random step, two runs on one --out, --overwrite on other people's files, a full disk, malformed
data reported before the model loads."""

from __future__ import annotations

import json
import os
import pty
import random
import resource
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from tests.examples.conftest import EXAMPLES, ROOT, assert_usage_error, run_script, tree_digest
from tests.helpers import child_threads, tiny_checkpoint

TEXTS = [f"Sockets carry bytes between processes number {i}; the json module encodes objects. " * 4 for i in range(12)]
# Metrics that measure the machine, not the run.
TIMING = {"tokens_per_s", "peak_mem", "peak_mem_kind", "time"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trust")
    base, _ = tiny_checkpoint(tmp / "base", vocab_size=151936, tie_word_embeddings=True)
    corpus = tmp / "corpus"
    corpus.mkdir()
    for i, text in enumerate(TEXTS):
        (corpus / f"d{i:02d}.txt").write_text(text, encoding="utf-8")
    return {"base": base, "corpus": corpus, "cache": tmp / "cache"}


def cpt_args(inputs, out, *extra):
    return ["--model", inputs["base"], "--data", inputs["corpus"], "--out", out, "--block-size", "32",
            "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-2", "--lora-r", "4", "--max-steps", "6",
            "--dtype", "fp32", "--eval-fraction", "0.2", "--sample-tokens", "2", "--save-every", "1", *extra]


def env(inputs):
    e = dict(os.environ, OMP_NUM_THREADS=child_threads(), PYTHONUNBUFFERED="1", QWEN_TUNE_CACHE=str(inputs["cache"]))
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def start(inputs, name, args, **kwargs):
    return subprocess.Popen([sys.executable, str(EXAMPLES / name), *map(str, args)], cwd=ROOT, env=env(inputs),
                            **kwargs)


def metrics(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def adapter(out):
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def same_tensors(a, b):
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def checkpoint_tensors(out):
    files = sorted((out / "checkpoints").rglob("*.safetensors"))
    return {str(f.relative_to(out)): load_file(str(f)) for f in files}


def run_with_terminal(inputs, args) -> int:
    """The script with its stderr on a pseudo-terminal (a progress bar is drawn), as in a shell."""
    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))   # a terminal 100 columns wide
    proc = start(inputs, "cpt.py", args, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    assert b"train:" in seen or b"step/s" in seen or b"it/s" in seen, seen[-500:]   # tqdm drew its bar
    return proc.wait()


# ---------------------------------------------------------------------- reproducibility
@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    """The uninterrupted run, stderr not a terminal."""
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = run_script("cpt.py", *cpt_args(inputs, out), cache=inputs["cache"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_same_command_same_seed_is_bit_identical_with_or_without_a_terminal(inputs, reference, tmp_path):
    ref, _ = reference
    again = tmp_path / "again"
    proc = run_script("cpt.py", *cpt_args(inputs, again), cache=inputs["cache"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    tty = tmp_path / "tty"
    assert run_with_terminal(inputs, cpt_args(inputs, tty)) == 0
    for other in (again, tty):
        assert same_tensors(adapter(ref), adapter(other))
        assert metrics(ref) == metrics(other)
        ours, theirs = checkpoint_tensors(ref), checkpoint_tensors(other)
        assert ours.keys() == theirs.keys() and all(same_tensors(ours[k], theirs[k]) for k in ours)


def test_same_command_same_seed_is_bit_identical_in_bf16(inputs, tmp_path):
    """bf16 autocast (fp32 adapters and optimizer, bf16 matmuls): the same command twice."""
    runs = [tmp_path / "one", tmp_path / "two"]
    for out in runs:
        proc = run_script("cpt.py", *cpt_args(inputs, out, "--dtype", "bf16", "--max-steps", "3"), cache=inputs["cache"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "dtype bf16" in proc.stdout
    assert same_tensors(adapter(runs[0]), adapter(runs[1]))
    assert metrics(runs[0]) == metrics(runs[1])


def test_another_seed_gives_another_adapter(inputs, reference, tmp_path):
    """The test above can fail: the seed reaches the adapter's initialisation."""
    ref, _ = reference
    out = tmp_path / "seed1"
    proc = run_script("cpt.py", *cpt_args(inputs, out, "--seed", "1"), cache=inputs["cache"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not same_tensors(adapter(ref), adapter(out))


def test_progress_lines_without_a_terminal(reference):
    _, proc = reference
    lines = [l for l in proc.stderr.splitlines() if l.startswith("step ")]
    assert lines and all("loss" in l and "lr" in l and "tokens/s" in l and "eta" in l for l in lines), proc.stderr
    assert lines[-1].startswith("step 6/6")


# ---------------------------------------------------------------------- interruption
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_a_signal_exits_honestly_and_resume_finishes_the_same_run(inputs, reference, tmp_path, sig, code):
    ref, _ = reference
    out = tmp_path / "cut"
    stop_after = random.Random(sig).randint(1, 4)
    proc = start(inputs, "cpt.py", cpt_args(inputs, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        done = out / "checkpoints" / f"step-{stop_after}"
        if done.is_dir():
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == code, stderr[-3000:]
    assert "Traceback" not in stderr
    assert f"stopped by {signal.Signals(sig).name} after step" in stderr
    assert "continue with: python" in stderr and "--resume" in stderr
    assert not (out / "adapter").exists()                       # nothing final from a half-trained run
    assert "next: python examples/merge.py" not in stdout
    proc = run_script("cpt.py", *cpt_args(inputs, out, "--resume"), cache=inputs["cache"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resume: continuing from" in proc.stdout
    assert same_tensors(adapter(ref), adapter(out))
    assert metrics(ref) == metrics(out)


def test_resume_of_a_run_that_saved_nothing_says_so(inputs, tmp_path):
    out = tmp_path / "empty"
    from cli import outdir

    # What an interruption before the first checkpoint leaves: the run's marker, nothing else.
    proc = run_script("cpt.py", *cpt_args(inputs, out, "--max-steps", "1"), cache=inputs["cache"])
    assert proc.returncode == 0
    for p in ("adapter", "checkpoints", "metrics.jsonl"):
        path = out / p
        (path.unlink() if path.is_file() else __import__("shutil").rmtree(path))
    assert outdir.read_marker(out) is not None
    proc = run_script("cpt.py", *cpt_args(inputs, out, "--max-steps", "1", "--resume"), cache=inputs["cache"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resume: no complete checkpoint in {out / 'checkpoints'}; starting from step 0" in proc.stdout


# ---------------------------------------------------------------------- one run per --out
def test_a_second_run_on_the_same_out_is_refused_at_once_naming_the_holder(inputs, tmp_path):
    out = tmp_path / "busy"
    first = start(inputs, "cpt.py", cpt_args(inputs, out, "--max-steps", "400"),
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / ".qwen-tune.lock").exists() and time.time() < deadline:
            time.sleep(0.05)
        t0 = time.time()
        proc = run_script("cpt.py", *cpt_args(inputs, out, "--max-steps", "400"), cache=inputs["cache"])
        assert_usage_error(proc, "--out", "in use by another run", f"pid {first.pid}")
        assert time.time() - t0 < 60
        proc = run_script("cpt.py", *cpt_args(inputs, out, "--max-steps", "400", "--overwrite"), cache=inputs["cache"])
        assert_usage_error(proc, "in use by another run")       # --overwrite never deletes a running job
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # kill -9 leaves no stale lock: the next run on that folder gets it (and is refused only
    # for what the folder holds, not for a dead holder)
    proc = run_script("cpt.py", *cpt_args(inputs, out, "--max-steps", "400", "--lr", "5e-3"), cache=inputs["cache"])
    assert_usage_error(proc, "different run")


# ---------------------------------------------------------------------- never destroy
def test_merge_overwrite_never_deletes_the_base_or_a_users_files(inputs, reference, tmp_path):
    import shutil

    ref, _ = reference
    home = tmp_path / "models"
    base = home / "base"
    shutil.copytree(inputs["base"], base)
    (home / "notes.txt").write_text("mine")
    before = tree_digest(home)
    proc = run_script("merge.py", "--model", base, "--adapter", ref / "adapter", "--out", home, "--overwrite",
                      cache=inputs["cache"])
    assert_usage_error(proc, "--out", "holds the input")
    proc = run_script("merge.py", "--model", base, "--adapter", ref / "adapter", "--out", base / "merged",
                      "--overwrite", cache=inputs["cache"])
    assert_usage_error(proc, "--out", "lies inside the input")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    proc = run_script("merge.py", "--model", base, "--adapter", ref / "adapter", "--out", mine, "--overwrite",
                      cache=inputs["cache"])
    assert_usage_error(proc, "--out", "was not written by these scripts")
    assert tree_digest(home) == before and (mine / "thesis.tex").read_text() == "precious"


def test_extend_vocab_overwrite_keeps_user_files(inputs, tmp_path):
    out = tmp_path / "ext"
    out.mkdir()
    (out / "keep.me").write_text("x")
    proc = run_script("extend_vocab.py", "--token", " asyncio", "--data", inputs["corpus"], "--out", out,
                      "--overwrite", cache=inputs["cache"])
    assert_usage_error(proc, "--out", "keep.me")
    assert (out / "keep.me").read_text() == "x"


# ---------------------------------------------------------------------- failures at run time, bad input
def test_a_full_disk_is_one_line_and_exit_1(inputs, tmp_path):
    """Writes beyond a file-size limit fail (EFBIG) as a full disk does (ENOSPC): the run ends
    with one line, and the checkpoints written before stay complete."""
    out = tmp_path / "full"

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    proc = subprocess.run([sys.executable, str(EXAMPLES / "cpt.py"), *map(str, cpt_args(inputs, out))], cwd=ROOT,
                          env=env(inputs), capture_output=True, text=True, preexec_fn=limit, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = [l for l in proc.stderr.splitlines() if l.strip() and not l.startswith("step ")]
    assert len(lines) == 1 and "failed:" in lines[0] and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    import train

    found = train.newest_checkpoint(out / "checkpoints")   # the last complete checkpoint is intact (or none)
    assert found is None or train.complete_checkpoints(out / "checkpoints")[-1] == found


def test_malformed_data_is_reported_before_the_model_loads(inputs, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(inputs["base"], broken)
    (broken / "model.safetensors").write_bytes(b"\0" * 16)    # loading it would fail
    data = tmp_path / "sft.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
                    '{"messages": [\n', encoding="utf-8")
    proc = run_script("sft.py", "--model", broken, "--data", data, "--out", tmp_path / "o", cache=inputs["cache"])
    assert_usage_error(proc, "sft.jsonl:2")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags, needles", [
    (["--lora-targets", "q_proj,wq"], ["--lora-targets q_proj,wq", "wq"]),
    (["--block-size", "32", "--resume"], ["--resume", "holds no run to resume"]),
])
def test_bad_flags_are_one_line_before_anything_loads(inputs, tmp_path, flags, needles):
    proc = run_script("cpt.py", *cpt_args(inputs, tmp_path / "o"), *flags, cache=inputs["cache"])
    assert_usage_error(proc, *needles)
    assert not (tmp_path / "o").exists()


def test_block_size_above_the_models_context_is_said(inputs, tmp_path):
    proc = run_script("cpt.py", *cpt_args(inputs, tmp_path / "o", "--max-steps", "1"), "--block-size", "300",
                      cache=inputs["cache"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--block-size 300 is above the model's max_position_embeddings 256" in proc.stderr
