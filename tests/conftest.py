import os

import torch

# Two cores on CI: keep torch from oversubscribing them, and keep tests deterministic.
torch.set_num_threads(int(os.environ.get("TEST_TORCH_THREADS", "2")))
# On a GPU machine: full fp32 matmuls, so the CUDA cases of the reference tests keep the CPU
# cases' fp32 bounds (TF32 would round operands to 10 mantissa bits).
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
