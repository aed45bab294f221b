"""`python -m lora.delta ...`: see lora.delta.cli."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
