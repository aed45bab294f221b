import math
import os

import torch


def _cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota (a container)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def _test_threads() -> int:
    """Torch threads per test process: $TEST_TORCH_THREADS, else 2 (CI's two cores) in a serial run
    and the worker's share of the CPUs under pytest-xdist (two workers on two cores: one each)."""
    if os.environ.get("TEST_TORCH_THREADS"):
        return int(os.environ["TEST_TORCH_THREADS"])
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    return max(1, min(2, _cpus() // workers)) if workers else 2


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (setup.cfg's addopts): one worker per usable CPU, at most 4 (more only repeat
    every worker's imports and module fixtures). $PYTEST_XDIST_AUTO_NUM_WORKERS overrides, as in xdist."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
    return min(4, _cpus())


# Two cores on CI: keep torch from oversubscribing them, and keep tests deterministic. The value
# is exported so that the scripts the tests run in subprocesses take the same share
# (tests.helpers.child_threads: their OMP_NUM_THREADS).
THREADS = _test_threads()
os.environ["TEST_TORCH_THREADS"] = str(THREADS)
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))   # and the subprocesses that set nothing
torch.set_num_threads(THREADS)
# On a GPU machine: full fp32 matmuls, so the CUDA cases of the reference tests keep the CPU
# cases' fp32 bounds (TF32 would round operands to 10 mantissa bits).
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
