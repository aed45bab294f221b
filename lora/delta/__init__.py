"""Weight-delta tooling on whole HF-format Qwen checkpoints, streaming shard by shard.

    from lora.delta import diff, apply, instruction_residual, task_arithmetic, extract_lora, delta_report
    diff(chat, base, "out/delta")                         # delta checkpoint chat - base (float32)
    apply(cpt, "out/delta", "out/model", scale=1.0)       # cpt + scale * delta
    instruction_residual(base, chat, cpt, "out/chat-cpt") # cpt + s * (chat - base), chat tokenizer, eos <|im_end|>
    task_arithmetic(["d1", "d2"], [1.0, -0.5], "out/m", base=base)
    res = extract_lora("out/delta", 16, "out/adapter")    # PEFT adapter of the best rank-16 approximation
    print(delta_report(chat, base).table())               # ||delta|| / ||W|| per layer and group

All operations read one row chunk of one tensor at a time from the safetensors shards,
compute in float32 (float64 for float32 inputs), cast once to the output dtype and append
to output shards laid out like the target's; the output directory appears atomically with a
manifest.json (inputs and their sha256, scales, skipped tensors). Inputs are never modified.
CLI: `python -m lora.delta --help`.
"""

from .combine import ARCH_FIELDS, check_compatible
from .groups import GROUPS, layer_index, module_group
from .io import DeltaError, ModelFolder
from .lowrank import Extraction, extract_lora, low_rank
from .ops import apply, diff, instruction_residual, task_arithmetic
from .report import DeltaReport, delta_report

__all__ = [
    "diff", "apply", "instruction_residual", "task_arithmetic", "extract_lora", "delta_report",
    "DeltaReport", "Extraction", "DeltaError", "ModelFolder", "GROUPS",
    "module_group", "layer_index", "low_rank", "check_compatible", "ARCH_FIELDS",
]
