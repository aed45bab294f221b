"""Exit codes and the error boundary around every script's main().

    0    done
    1    a failure at run time: one line (disk full, non-finite loss naming step and parameter, ...)
    2    bad input or a refusal: one line naming the flag, file, line or key (busy --out,
         --overwrite of a folder the library did not write, a malformed data line, ...)
    130  stopped by SIGINT (Ctrl-C), 143 stopped by SIGTERM: a checkpoint was saved when training
         had started, nothing final was written, and the line says how to resume
    141  stdout was closed by its reader (`generate.py | head -3`): a quiet stop, as a Unix tool
         killed by SIGPIPE (no message; outputs not yet complete are released)

A traceback means a bug in the library, never bad input.
"""

from __future__ import annotations

import errno
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Callable, Optional

from fileio.errors import QwenTuneError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}
EXIT_BROKEN_PIPE = 128 + 13  # SIGPIPE, as a shell reports a tool it killed


class UsageError(QwenTuneError):
    """Bad input or a refusal: printed as one line, exit code 2."""


class RunFailure(QwenTuneError):
    """A failure at run time that is not the user's input: printed as one line, exit code 1."""

    bad_input = False


# Python's own errors that come from the user's input (a path that is not there, not readable, not text).
BAD_INPUT_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
                       UnicodeDecodeError)


def exit_code(error: BaseException) -> Optional[int]:
    """EXIT_USAGE (2) or EXIT_FAILURE (1) for an error printed as one line; None for a bug (a
    traceback). Every error of the library derives from QwenTuneError, whose `bad_input` says
    which; of the others, BAD_INPUT_OS_ERRORS are bad input and any other OSError or running out
    of memory a run-time failure."""
    import torch

    if isinstance(error, QwenTuneError):
        return EXIT_USAGE if error.bad_input else EXIT_FAILURE
    if isinstance(error, BAD_INPUT_OS_ERRORS):
        return EXIT_USAGE
    if isinstance(error, (OSError, MemoryError, torch.OutOfMemoryError)):
        return EXIT_FAILURE
    return None


def one_line(error: BaseException) -> str:
    """The error's message on one line (an OSError as 'strerror: filename')."""
    if isinstance(error, OSError) and error.strerror:
        text = f"{error.strerror}: {error.filename}" if error.filename else error.strerror
        if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            text += " (free some space or choose another --out; the last complete checkpoint is intact)"
        return text
    message = " ".join(str(error).split()) or type(error).__name__
    if "No space left on device" in message or "StorageFull" in message:
        message = "No space left on device while writing (free some space or choose another --out; " \
                  "the last complete checkpoint is intact)"
    return message


def resume_command(argv: Optional[list[str]] = None) -> str:
    """The command line that continues this run: the same arguments plus --resume."""
    argv = list(sys.argv if argv is None else argv)
    args = [a for a in argv[1:] if a != "--overwrite"]
    if "--resume" not in args:
        args.append("--resume")
    program = f"python {shlex.quote(argv[0])}" if argv[0].endswith(".py") else argv[0]   # or "qwen-tune cpt"
    return " ".join([program] + [shlex.quote(a) for a in args])


def _raise_on_sigterm(signum, frame) -> None:
    from train import Interrupted

    raise Interrupted("SIGTERM")


def start_distributed() -> bool:
    """Under torchrun (WORLD_SIZE > 1): join the process group; only rank 0 prints on stdout."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    from train import distributed

    distributed.init_from_env()
    if not distributed.is_main():
        sys.stdout = open(os.devnull, "w", encoding="utf-8")
    return True


def _release_outputs() -> None:
    from .outdir import release_untouched

    release_untouched()


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush into the closed pipe is silent."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):   # stdout is not a real file (a test's capture)
        pass
    finally:
        os.close(devnull)


def run_main(main: Callable[[], Optional[int]]) -> None:
    """Call main() and exit with the code the table in the module docstring gives.

    Under torchrun every process runs main() (see `start_distributed`). SIGTERM is turned into
    the same orderly stop as Ctrl-C (the training loop installs its own handlers while it runs).
    """
    prog = Path(sys.argv[0]).name
    from train import Interrupted

    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        distributed = start_distributed()
        code = main()
    except BrokenPipeError:
        _quiet_stdout()
        _release_outputs()
        raise SystemExit(EXIT_BROKEN_PIPE)
    except (KeyboardInterrupt, Interrupted) as e:
        stop = e if isinstance(e, Interrupted) else Interrupted("SIGINT")
        print(f"{prog}: {stop.describe()}", file=sys.stderr, flush=True)
        if stop.checkpoint is not None:
            print(f"{prog}: continue with: {resume_command()}", file=sys.stderr, flush=True)
        else:
            _release_outputs()
        raise SystemExit(EXIT_CODES[stop.signal])
    except Exception as e:
        failed = exit_code(e)
        if failed is None:
            raise   # a bug in the library: the traceback
        what = "error" if failed == EXIT_USAGE else "failed"
        print(f"{prog}: {what}: {one_line(e)}", file=sys.stderr, flush=True)
        _release_outputs()
        raise SystemExit(failed)
    try:
        sys.stdout.flush()   # what main() left buffered may still meet a closed pipe
    except BrokenPipeError:
        _quiet_stdout()
        code = EXIT_BROKEN_PIPE
    if distributed:
        from train.distributed import end_process

        end_process(code or EXIT_OK)   # past gloo's teardown at interpreter exit (see there)
    raise SystemExit(code or EXIT_OK)
