"""The stage scripts (recipes): each file is one stage, read top to bottom.

    python examples/cpt.py ...       or, installed:   qwen-tune cpt ...
"""

import _qwen_tune

_qwen_tune.claim(__name__)  # our sibling packages, not a user's same-named files (see _qwen_tune)
