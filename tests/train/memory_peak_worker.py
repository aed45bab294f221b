"""Subprocess of tests/train/test_memory_model.py: the peak RSS of one LoRA step per length.

argv: shape JSON, then lengths. Prints one JSON line {T: bytes the step's peak RSS rose above
the RSS before it}. The peak is /proc/self/status VmHWM, reset before each step by writing 5 to
/proc/self/clear_refs (Linux). Long forwards tile past 4096 tokens (1024-token MLP tiles)."""

import json
import sys

import torch

import lora
from models.qwen import Qwen, QwenConfig


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    shape = json.loads(sys.argv[1])
    lengths = [int(t) for t in sys.argv[2:]]
    model = Qwen(QwenConfig(**shape, torch_dtype="float32"))
    lora.inject(model, r=8, alpha=8)
    model.enable_gradient_checkpointing(True)
    model.long_context.auto_from, model.long_context.mlp_tile = 4096, 1024
    ids = torch.randint(0, shape["vocab_size"], (1, 64))
    model(ids, labels=ids).backward()  # warm-up: kernels, thread pools, adapter grads allocated
    out = {}
    for T in lengths:
        ids = torch.randint(0, shape["vocab_size"], (1, T))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status("VmRSS")
        model(ids, labels=ids).backward()
        out[T] = _status("VmHWM") - before
    print(json.dumps(out))


if __name__ == "__main__":
    main()
