#!/usr/bin/env bash
# The GGUF checks the README's test command cannot run: the exported files loaded and run by
# llama.cpp itself (tokens, logits, greedy output equal to models.qwen.generate), through
# llama-cpp-python. It has no wheel for this platform on PyPI and builds llama.cpp from source
# (10-20 minutes on 2 cores), which is why it is not in the test extra.
#
#     bash tests/llama_cpp_check.sh          # in the activated virtual environment of the tests
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import llama_cpp" 2>/dev/null || pip install llama-cpp-python
python -m pytest -q -rs tests/models/test_gguf.py tests/examples/test_export.py -k "llama_cpp or llama"
