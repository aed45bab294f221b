import os

import torch

# Two cores on CI: keep torch from oversubscribing them, and keep tests deterministic.
torch.set_num_threads(int(os.environ.get("TEST_TORCH_THREADS", "2")))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
