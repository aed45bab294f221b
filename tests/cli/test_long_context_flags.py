"""--long-context-tile / --long-context-from / --offload-activations reach model.long_context;
offload is refused on a CPU model with one line naming the flag."""

from __future__ import annotations

import pytest

from cli import flags, options
from cli.errors import UsageError
from cli.runtime import configure_long_context
from models.qwen import Qwen, QwenConfig
from tests.helpers import TINY_QWEN2


def test_flags_set_the_model_and_offload_is_refused_on_cpu():
    model = Qwen(QwenConfig(**{**TINY_QWEN2, "torch_dtype": "float32"}))
    p = options.parser("sft", "test")
    args, _ = flags.parse(p, ["--long-context-tile", "512", "--long-context-from", "0"], stage="sft")
    configure_long_context(model, args)
    lc = model.long_context
    assert (lc.mlp_tile, lc.attention_tile, lc.auto_from, lc.offload_inputs) == (512, 512, 0, False)
    args, _ = flags.parse(p, ["--offload-activations"], stage="sft")
    with pytest.raises(UsageError, match="--offload-activations needs the model on a GPU"):
        configure_long_context(model, args)
    defaults, _ = flags.parse(p, [], stage="sft")
    assert (defaults.long_context_tile, defaults.long_context_from) == (4096, 8192)
