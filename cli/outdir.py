"""What a script may do with its --out folder: one run at a time, and never destroy a user's files.

    claim(out, command="cpt", identity={...}, inputs=[model_dir, *data], resume=..., overwrite=...)

1. --out may not be, contain or lie inside any input (--model, --adapter, --data, ...).
2. An exclusive OS lock (`flock` on `out/.qwen-tune.lock`) is held for the whole run: a second
   process on the same --out exits 2 at once naming the holder (pid, host). The OS releases the
   lock when the process ends, however it ends (`kill -9` leaves no stale lock). Under torchrun,
   rank 0 holds it.
3. `run.json` is the marker and the identity of the run that wrote the folder. A folder holding
   this run needs --resume (continue) or --overwrite (start over); a different run or anything
   that is not ours is refused. --overwrite deletes only a folder whose run.json says this
   library wrote it, and only when every entry in it is one the library writes (a user's file
   inside stops it, named in the error).
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from fileio.atomic import LOCK_FILE, RUN_FILE
from fileio.folder import FOLDER_FILES
from fileio.safe_load import loads_json, read_json

from .errors import UsageError

WRITER = "qwen-tune"
# The entries each kind of output folder may hold (what --overwrite may delete).
TRAINING_OUTPUTS = (RUN_FILE, LOCK_FILE, "metrics.jsonl", "completions.jsonl", "train_config.json", "adapter",
                    "checkpoints", "merged", "model", "runs", ".tmp-*", ".old-*", ".del-*", ".*.tmp")
MODEL_OUTPUTS = (RUN_FILE, LOCK_FILE, "config.json", "generation_config.json", "model.safetensors",
                 "model-*-of-*.safetensors", "model.safetensors.index.json", "report.txt", "manifest.json",
                 "new_rows.safetensors", "vocab_report.*", "*.gguf", "Modelfile",
                 "report.md", "report.json", "loss_curves.png", "adapter_config.json", "adapter_model.safetensors",
                 "extraction_report.json", "delta-*.safetensors", "delta.safetensors*", ".tmp-*", ".old-*",
                 ".*.tmp", *FOLDER_FILES)  # (FOLDER_FILES: the tokenizer and processor files)
# Identity keys that may differ between a run and its --resume (they change no result).
IDENTITY_IGNORED = {"out", "resume", "overwrite", "config", "eval_every", "save_every", "keep_last", "log_every",
                    "report_to", "batch_size", "grad_accum", "fsdp"}

_held: dict[Path, int] = {}   # out dir -> fd of its lock file, held until the process ends
_created: list[Path] = []     # out dirs this process created (removed again if a refusal leaves them empty)


def run_identity(args, extra: Optional[dict] = None) -> dict:
    """The settings that make a run what it is (what --resume must match).

    The split of the global batch may change on --resume (another number of processes under
    torchrun); its size may not: the identity holds global_batch = batch-size x grad-accum x
    processes instead of the two flags.
    """
    ident = {k: v for k, v in sorted(vars(args).items()) if k not in IDENTITY_IGNORED}
    if hasattr(args, "batch_size") and hasattr(args, "grad_accum"):
        from train import distributed

        ident["global_batch"] = args.batch_size * args.grad_accum * distributed.world_size()
    ident.update(extra or {})
    return json.loads(json.dumps(ident, default=str))


def claim(out: Path, *, command: str, identity: dict, inputs: Iterable[Optional[os.PathLike]] = (),
          resume: bool = False, overwrite: bool = False, outputs: Sequence[str] = TRAINING_OUTPUTS,
          one_shot: bool = False, flag: str = "--out", fingerprint: Optional[dict] = None) -> Path:
    """Check that this run may use `out`, lock it for the rest of the process, and clear it on
    --overwrite. Returns `out`. Every refusal is a UsageError naming what is in the way.

    one_shot: a command that writes its output in one go (merge, export, delta tools): the same
    command again replaces its own output. A training run in `out` instead needs --resume to be
    continued, unless it has not saved anything yet (then it starts over).

    fingerprint: the content of the inputs (cli/fingerprint.py), recorded in run.json; --resume
    is refused when it differs from the one recorded, naming the first input that changed."""
    from train import distributed

    out = Path(out)
    check_not_an_input(out, inputs, flag)
    error = None
    if distributed.is_main():
        try:
            _claim_here(out, command, identity, resume, overwrite, outputs, one_shot, flag, fingerprint)
        except UsageError as e:
            error = str(e)
    error = distributed.broadcast_text(error)
    if error is not None:
        raise UsageError(error)
    return out


def _claim_here(out: Path, command: str, identity: dict, resume: bool, overwrite: bool,
                outputs: Sequence[str], one_shot: bool, flag: str, fingerprint: Optional[dict] = None) -> None:
    # Every refusal comes before anything is written (not even the lock file).
    if out.exists() and not out.is_dir():
        raise UsageError(f"{flag} {out}: exists and is not a directory")
    if (out / LOCK_FILE).is_file() and out.resolve() not in _held:
        lock(out, flag, probe=True)   # a running job is named first
    if resume and not (out / RUN_FILE).is_file():
        raise UsageError(f"--resume: {out} holds no run to resume (no {RUN_FILE}); start it without --resume")
    entries = [p for p in out.iterdir() if p.name != LOCK_FILE] if out.is_dir() else []
    previous = read_marker(out, flag) if entries else None
    if entries and previous is None:
        raise UsageError(f"{flag} {out}: exists, is not empty and was not written by these scripts "
                         f"({entries[0].name} is in it); choose another {flag}")
    if entries and overwrite:
        foreign = [p.name for p in entries if not any(fnmatch.fnmatch(p.name, pat) for pat in outputs)]
        if foreign:
            raise UsageError(f"--overwrite: {out} holds {foreign[0]!r}, which these scripts did not write; "
                             f"nothing was deleted (move it away or choose another {flag})")
    elif entries:
        if previous.get("command") != command:
            raise UsageError(f"{flag} {out}: holds the output of {previous.get('command')!r}, not of {command!r}; "
                             f"choose another {flag} or pass --overwrite")
        diff = _first_difference(previous.get("identity", {}), identity)
        if diff is not None:
            key, old, new = diff
            what = ("the global batch (--batch-size x --grad-accum x processes)" if key == "global_batch"
                    else f"--{key.replace('_', '-')}")
            raise UsageError(f"{flag} {out}: holds a different run ({what} was {old!r}, now {new!r}); "
                             f"choose another {flag} or pass --overwrite")
        if not (one_shot or resume or not has_progress(out)):
            raise UsageError(f"{flag} {out}: already holds this run; pass --resume to continue it, "
                             f"or --overwrite to start over")
        _check_same_inputs(out, previous, fingerprint, resume, identity)
    if not out.exists():
        _created.append(out)
    lock(out, flag)
    if entries and overwrite:
        clear(out)
    if not entries or overwrite or (fingerprint is not None and not resume):   # a new start records its inputs
        write_marker(out, command, identity, fingerprint)


def _check_same_inputs(out: Path, previous: dict, fingerprint: Optional[dict], resume: bool, identity: dict) -> None:
    """--resume continues a run only on the inputs it started with (same paths were checked by the
    identity; this checks their content)."""
    if not resume or fingerprint is None:
        return
    from .fingerprint import first_change

    change = first_change(previous.get("inputs"), fingerprint, identity.get("model", ""))
    if change is not None:
        raise UsageError(f"--resume: {change} since the run in {out} started; resume on the inputs it started "
                         f"with, or pass --overwrite to start over")


def has_progress(out: Path) -> bool:
    """Whether a training run in `out` saved anything that starting over would lose."""
    from train.checkpoint import complete_checkpoints

    return bool(complete_checkpoints(out / "checkpoints")) or any((out / d).exists() for d in ("adapter", "model", "merged"))


def check_not_an_input(out: Path, inputs: Iterable[Optional[os.PathLike]], flag: str = "--out") -> None:
    """--out must not be an input, contain one, or lie inside one."""
    target = Path(os.path.abspath(out)).resolve()
    for item in inputs:
        if item is None:
            continue
        source = Path(os.path.abspath(item)).resolve()
        if target == source or source.is_relative_to(target):
            raise UsageError(f"{flag} {out}: holds the input {item}; choose an --out outside every input")
        if target.is_relative_to(source):
            raise UsageError(f"{flag} {out}: lies inside the input {item}; choose an --out outside every input")


def lock(out: Path, flag: str = "--out", probe: bool = False) -> None:
    """Take the exclusive lock of `out` (created if missing) for the rest of this process.
    probe: only check that nobody holds it (an existing lock file is opened, nothing is written)."""
    import fcntl

    out = out.resolve() if out.exists() else out
    if out in _held:
        return
    path = out / LOCK_FILE
    if probe:
        fd = os.open(path, os.O_RDONLY)
    else:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        try:
            holder = loads_json(os.pread(fd, 4096, 0) or b"{}")
        except ValueError:   # a torn or foreign lock file: the holder is unknown
            holder = {}
        holder = holder if isinstance(holder, dict) else {}
        os.close(fd)
        who = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
        raise UsageError(f"{flag} {out}: in use by another run ({who}); wait for it, or choose another {flag}") from None
    if probe:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        return
    info = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode("utf-8")
    os.ftruncate(fd, 0)
    os.pwrite(fd, info, 0)
    _held[out.resolve()] = fd


def release_untouched() -> None:
    """Remove the --out folders this process created and wrote nothing into but its own marker and
    lock (a run refused after claiming --out, e.g. for a malformed data file, leaves no trace)."""
    for out in _created:
        if out.is_dir() and all(p.name in (LOCK_FILE, RUN_FILE) for p in out.iterdir()):
            shutil.rmtree(out, ignore_errors=True)
    _created.clear()


def clear(out: Path) -> None:
    """Delete everything in `out` but the lock (which this process holds)."""
    for p in out.iterdir():
        if p.name == LOCK_FILE:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def read_marker(out: Path, flag: str = "--out") -> Optional[dict]:
    """The run.json these scripts wrote into `out`, or None when there is none (or not ours)."""
    file = out / RUN_FILE
    if not file.is_file():
        return None
    try:
        data = read_json(file, UsageError)
    except UsageError as e:
        raise UsageError(f"{flag} {out}: {e}; choose another {flag}") from None
    if not isinstance(data, dict) or data.get("written_by") != WRITER:
        return None
    for key in ("identity", "inputs"):
        if not isinstance(data.get(key, {}), dict):
            raise UsageError(f"{flag} {out}: {file}: {key!r} is not a JSON object (a damaged {RUN_FILE}); "
                             f"choose another {flag} or pass --overwrite")
    return data


def write_marker(out: Path, command: str, identity: dict, inputs: Optional[dict] = None) -> None:
    """run.json: who wrote this folder, with which settings and inputs (atomic replace)."""
    out.mkdir(parents=True, exist_ok=True)
    record = {"written_by": WRITER, "command": command, "identity": identity}
    if inputs is not None:
        record["inputs"] = inputs
    tmp = out / f".{RUN_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, out / RUN_FILE)


def run_settings(folder: Path) -> dict:
    """The identity recorded in `folder`/run.json ({} when there is none): e.g. the base model
    and --qlora of the run that wrote an adapter's parent folder."""
    try:
        data = read_marker(folder)
    except UsageError:
        return {}
    return dict(data.get("identity", {})) if data else {}


def _first_difference(old: dict, new: dict) -> Optional[tuple[str, Any, Any]]:
    for key in sorted(set(old) | set(new)):
        if key in IDENTITY_IGNORED:
            continue
        if old.get(key) != new.get(key):
            return key, old.get(key), new.get(key)
    return None


def claim_training_run(args, stage: str, model_dir: Path, data: Sequence[Path], eval_data: Optional[Path] = None) -> Path:
    """The common start of a training stage, once its inputs are known: the adapter targets
    checked on the model's shape, the stage's default length and dtype filled in, and --out
    claimed for this run (identity: the flags, the model and the data). Returns --out."""
    from . import flags, inputs, options, runtime

    if args.finetuning != "full" and (Path(model_dir) / "config.json").is_file():
        inputs.check_lora_targets(model_dir, flags.lora_targets(args.lora_targets))
    if args.epochs is None and args.max_steps is None:
        args.epochs = options.recommended_epochs(stage)
    args.dtype = runtime.compute_dtype(args.dtype)
    identity = run_identity(args, {
        "stage": stage, "model": str(Path(model_dir).resolve()), "data": [str(Path(p).resolve()) for p in data],
        **({"eval_data": str(Path(eval_data).resolve())} if eval_data is not None else {}),
    })
    from train import distributed

    from .fingerprint import training_inputs

    prints = training_inputs(model_dir, data, eval_data) if distributed.is_main() else None   # rank 0 claims
    return claim(Path(args.out), command=stage, identity=identity, inputs=[model_dir, *data, eval_data],
                 resume=args.resume, overwrite=args.overwrite, fingerprint=prints)
