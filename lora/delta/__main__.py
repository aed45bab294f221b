"""`python -m lora.delta ...` = `qwen-tune delta ...`: the command line lives with the other
scripts' in cli/delta.py (an entry point, like examples/, sits above every package)."""

import sys

import _qwen_tune

_qwen_tune.claim("cli")  # cli and what it needs are ours, whatever the working directory holds

from cli.delta import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m lora.delta"))
