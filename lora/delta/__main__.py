"""`python -m lora.delta ...` = `qwen-tune delta ...`: the command line lives with the other
scripts' in cli/delta.py (an entry point, like examples/, sits above every package)."""

import sys

from cli.delta import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m lora.delta"))
