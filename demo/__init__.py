"""The embedded default: what every stage script runs on with no arguments, on any machine.

    corpus.py      Python's own documentation as the corpus: "general" and "domain" text, SFT pairs
    base_model.py  the small Qwen2-architecture base, pretrained once on the general text and cached

The flag values the demo model runs with are declared with each stage's options
(cli/options.py, `Stage.embedded`; --help shows them).
"""

import _qwen_tune

_qwen_tune.claim(__name__)  # our sibling packages, not a user's same-named files (see _qwen_tune)
