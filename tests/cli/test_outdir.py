"""--out rules in-process: one run per folder (an OS lock), --overwrite only of our own folders,
never an input, the marker and identity of a run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from cli import outdir
from cli.errors import UsageError

IDENT = {"lr": 1e-4, "model": "m"}


@pytest.fixture(autouse=True)
def _fresh_locks():
    yield
    for fd in outdir._held.values():
        os.close(fd)
    outdir._held.clear()


def _hold_lock_in_child(path):
    code = ("import sys, time; from cli import outdir; outdir.lock(__import__('pathlib').Path(sys.argv[1])); "
            "print('locked', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    return child


def test_second_process_is_refused_naming_the_holder_and_kill_9_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "run"
    child = _hold_lock_in_child(out)
    try:
        with pytest.raises(UsageError) as e:
            outdir.claim(out, command="cpt", identity=IDENT)
        assert f"in use by another run (pid {child.pid} on host {socket.gethostname()})" in str(e.value)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    outdir.claim(out, command="cpt", identity=IDENT)   # the OS released the dead process's lock
    assert outdir.read_marker(out)["identity"] == IDENT


def test_same_run_needs_resume_once_it_has_progress(tmp_path):
    out = tmp_path / "out"
    outdir.claim(out, command="cpt", identity=IDENT)
    outdir.claim(out, command="cpt", identity=IDENT)          # nothing saved yet: starts over
    (out / "adapter").mkdir()
    with pytest.raises(UsageError, match="already holds this run; pass --resume"):
        outdir.claim(out, command="cpt", identity=IDENT)
    outdir.claim(out, command="cpt", identity=IDENT, resume=True)
    with pytest.raises(UsageError, match=r"different run \(--lr was 0.0001, now 0.0002\)"):
        outdir.claim(out, command="cpt", identity=dict(IDENT, lr=2e-4), resume=True)
    with pytest.raises(UsageError, match="holds the output of 'cpt', not of 'sft'"):
        outdir.claim(out, command="sft", identity=IDENT)
    outdir.claim(out, command="cpt", identity=dict(IDENT, lr=2e-4), overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [outdir.LOCK_FILE, outdir.RUN_FILE]   # the old run is gone


def test_resume_without_a_run(tmp_path):
    with pytest.raises(UsageError, match="holds no run to resume"):
        outdir.claim(tmp_path / "nothing", command="cpt", identity=IDENT, resume=True)


def test_overwrite_never_deletes_what_the_library_did_not_write(tmp_path):
    out = tmp_path / "out"
    outdir.claim(out, command="cpt", identity=IDENT)
    (out / "adapter").mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(UsageError, match="holds 'thesis.tex', which these scripts did not write; nothing was deleted"):
        outdir.claim(out, command="cpt", identity=IDENT, overwrite=True)
    assert (out / "thesis.tex").read_text() == "precious" and (out / "adapter").is_dir()
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("mine")
    with pytest.raises(UsageError, match="was not written by these scripts"):
        outdir.claim(notes, command="merge", identity=IDENT, overwrite=True, one_shot=True)
    assert (notes / "a.txt").read_text() == "mine"


@pytest.mark.parametrize("where", ["parent", "same", "inside"])
def test_out_may_not_touch_an_input(tmp_path, where):
    model = tmp_path / "models" / "base"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    out = {"parent": tmp_path / "models", "same": model, "inside": model / "merged"}[where]
    with pytest.raises(UsageError, match="input"):
        outdir.claim(out, command="merge", identity=IDENT, inputs=[model], overwrite=True, one_shot=True)
    assert (model / "config.json").read_text() == "{}"
    assert not (model / "merged").exists()


def test_files_get_the_umask_permissions(tmp_path):
    from torch import nn

    import lora

    old = os.umask(0o022)
    try:
        model = nn.Sequential(nn.Linear(4, 4))
        lora.inject(model, r=2, targets=["0"])
        lora.save(model, tmp_path / "adapter")
        for f in (tmp_path / "adapter").iterdir():
            assert f.stat().st_mode & 0o777 == 0o644, f
        assert (tmp_path / "adapter").stat().st_mode & 0o777 == 0o755
    finally:
        os.umask(old)
