"""Data-parallel training on torch.distributed: DDP or FSDP2, launched with torchrun.

    torchrun --nproc_per_node 4 examples/cpt.py ...       # or: python -m torch.distributed.run ...
    init_from_env()                   # WORLD_SIZE > 1: process group from the environment, nccl/gloo
    trainer = Trainer(model, TrainConfig(parallel="ddp" | "fsdp", ...), data)   # the rest is the Trainer's

The Trainer holds a `DataParallel` (below) and asks it for everything that involves more
than one process, so with one process (no process group, or parallel="none") each call is a
no-op and the loop is exactly the single-device loop. The rules it implements:

- every rank builds the same model; the trainable parameters are broadcast from rank 0 once
  (with LoRA that is only the adapter, never the frozen base);
- each optimizer step, rank r takes every W-th sample of the step's global batch
  (`MicroBatchSampler`); the supervised-token count N is summed over ranks before any
  backward, each rank backpropagates (its token-loss sum) x W / N, and DDP / FSDP average the
  gradients over the W ranks: the result is the gradient of the mean over every supervised
  token of the global batch, whatever the world size;
- DDP (`parallel="ddp"`) replicates the model and all-reduces the gradients of the trainable
  parameters only, once per step: the non-final micro-batches run under `no_sync`;
- FSDP2 (`parallel="fsdp"`, `torch.distributed.fsdp.fully_shard` on every decoder layer and
  on the root) shards parameters, gradients and optimizer state; gradients are reduce-scattered
  on the last micro-batch only. Checkpoints and exports gather the full tensors onto rank 0's
  CPU (`full_parameters`, `full_tensors`), so they are the ordinary single-process files: a
  run resumes under any world size and the HF-format export is the normal one;
- rank 0 alone writes files; the others wait at barriers; a signal on any rank stops all.

Checkpoints are read by every rank from --out, which must therefore be on a filesystem
all nodes share (as with any torchrun job that resumes).
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from typing import Iterator, NoReturn, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .phases import is_two_phase

TIMEOUT_ENV = "QWEN_TUNE_DIST_TIMEOUT"   # seconds a collective may wait for the other ranks
DEFAULT_TIMEOUT_S = 1800.0
STRATEGIES = ("ddp", "fsdp", "none")


# ---------------------------------------------------------------------- the process group
def init_from_env(timeout_s: Optional[float] = None) -> bool:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, MASTER_ADDR, ...).

    nccl when CUDA is available (each process on cuda:LOCAL_RANK), else gloo. A no-op
    returning False when WORLD_SIZE is unset or 1; True when the group is (already) up.
    timeout_s bounds every collective, so a rank that dies makes the others fail instead of
    hanging (default $QWEN_TUNE_DIST_TIMEOUT or 30 minutes).
    """
    if dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if timeout_s is None:
        timeout_s = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return True


def shutdown() -> None:
    """Leave the process group (after a last barrier, so no rank tears down under another)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def end_process(code: int = 0) -> NoReturn:
    """Leave the process group, flush stdout and stderr, and end this process with `code` without
    the interpreter's teardown.

    Why: at interpreter exit, C++ destructors of torch.distributed's gloo objects can meet worker
    threads that are still joinable, and std::terminate then aborts a run that had finished
    ("terminate called without an active exception", exit -6 after the last step, which torchrun
    reports as a failed job; seen under load on CPU). Everything a run writes is closed by then.
    """
    shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):   # a closed pipe or stream: nothing left to say there
            pass
    os._exit(code)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    """This process's accelerator: cuda:LOCAL_RANK with CUDA, else the CPU."""
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. fills a cache); the other ranks run it afterwards."""
    if not is_distributed():
        yield
        return
    if not is_main():
        dist.barrier()
    yield
    if is_main():
        dist.barrier()


def broadcast_text(text: Optional[str]) -> Optional[str]:
    """Rank 0's `text` (or None) on every rank; unchanged without a process group."""
    if not is_distributed():
        return text
    box = [text]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rank_seed(seed: int, rank_: int, step: int = 0) -> int:
    """A seed of its own for each rank (dropout masks differ between ranks), from (seed, rank, step)."""
    return int(np.random.SeedSequence([seed, rank_, step]).generate_state(1)[0])


# ---------------------------------------------------------------------- tensors across ranks
def is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def shard_as(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`tensor` (a full, identical copy on every rank) laid out as `like`: this rank's FSDP
    shard when `like` is a DTensor, else `tensor` itself. No communication."""
    if not is_dtensor(like):
        return tensor
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(tensor.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


class DataParallel:
    """What the Trainer needs from torch.distributed; every method is a no-op with one process.

    strategy: "ddp", "fsdp", or "none" (train in this process alone even inside a process
    group, e.g. rank 0 building a cache while the others wait).
    """

    def __init__(self, strategy: str = "ddp"):
        if strategy not in STRATEGIES:
            raise ValueError(f"parallel={strategy!r}: expected one of {STRATEGIES}")
        self.strategy = strategy
        on = strategy != "none" and is_distributed()
        self.rank = dist.get_rank() if on else 0
        self.world_size = dist.get_world_size() if on else 1
        self.enabled = self.world_size > 1
        self.fsdp = self.enabled and strategy == "fsdp"
        # nccl moves CUDA tensors only; gloo CPU tensors.
        nccl = self.enabled and dist.get_backend() == "nccl"
        self.comm_device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ model
    def check_supported(self, mode: str, quantized: bool) -> None:
        if not self.fsdp:
            return
        if is_two_phase(mode):
            raise ValueError(f"parallel='fsdp' does not support mode={mode!r} (adapters cannot be injected "
                             "into a sharded model): train the two phases as two runs, or use parallel='ddp'")
        if quantized:
            raise ValueError("parallel='fsdp' with an NF4-quantised base is not supported: QLoRA fits one device, "
                             "use parallel='ddp'")

    def prepare(self, model: nn.Module) -> nn.Module:
        """The module forward/backward run through once the trainable set is fixed: a DDP
        wrapper of `model`, `model` itself sharded in place by FSDP2, or `model` (one process)."""
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not self.enabled or not trainable:   # nothing to train: the optimizer setup says so
            return model
        self.broadcast_([p for p in trainable if not is_dtensor(p)])
        if self.fsdp:
            self._shard(model)
            return model
        from torch.nn.parallel import DistributedDataParallel

        dev = next(model.parameters()).device
        # init_sync=False: the trainable parameters were just broadcast; the frozen base (the
        # same checkpoint on every rank) is never sent. No buffers change during training.
        return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                       init_sync=False, forward_sync_buffers=False)

    def _shard(self, model: nn.Module) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from models.qwen.model import DecoderLayer

        if any(is_dtensor(p) for p in model.parameters()):
            return  # already sharded
        mesh = init_device_mesh(self.comm_device.type, (self.world_size,))
        for block in [m for m in model.modules() if isinstance(m, DecoderLayer)]:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)   # the rest: embeddings, final norm, head (tied or not)

    def sync_gradients(self, forward_model: nn.Module, last: bool):
        """Context for one micro-batch's forward+backward: gradients are communicated only
        on the step's last micro-batch (DDP no_sync / FSDP2 requires_gradient_sync)."""
        if not self.enabled:
            return nullcontext()
        if self.fsdp:
            forward_model.set_requires_gradient_sync(last)
            return nullcontext()
        return nullcontext() if last else forward_model.no_sync()

    # ------------------------------------------------------------------ collectives
    def all_reduce(self, values: Sequence[float], op: str = "sum") -> list[float]:
        """Element-wise sum/min/max of a few numbers over the ranks (float64)."""
        if not self.enabled:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
        return t.tolist()

    def any(self, flag: bool) -> bool:
        return bool(self.all_reduce([1.0 if flag else 0.0], op="max")[0])

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    @torch.no_grad()
    def broadcast_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Overwrite `tensors` on every rank with rank 0's values."""
        if not self.enabled:
            return
        for t in tensors:
            if t.device == self.comm_device:
                dist.broadcast(t.detach(), src=0)
            else:
                buf = t.detach().to(self.comm_device)
                dist.broadcast(buf, src=0)
                t.detach().copy_(buf)

    def gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's `data`, in rank order, on rank 0 (an empty list elsewhere)."""
        if not self.enabled:
            return [data]
        size = torch.tensor([len(data)], dtype=torch.int64, device=self.comm_device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size)
        longest = max(int(s) for s in sizes)
        buf = torch.zeros(longest, dtype=torch.uint8)
        if data:
            buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        bufs = [torch.zeros(longest, dtype=torch.uint8, device=self.comm_device) for _ in range(self.world_size)]
        dist.all_gather(bufs, buf.to(self.comm_device))
        if not self.is_main:
            return []
        return [b[: int(s)].cpu().numpy().tobytes() for b, s in zip(bufs, sizes)]

    # ------------------------------------------------------------------ FSDP: full tensors
    @torch.no_grad()
    def full_tensors(self, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """FSDP shards gathered into full CPU tensors on rank 0 ({} on the others; plain
        tensors pass through). Every rank must call it with the same names in the same order."""
        if not self.fsdp:
            return named
        out = {}
        for name, t in named.items():
            full = t.full_tensor() if is_dtensor(t) else t
            if self.is_main:
                out[name] = full.cpu()
        return out

    @contextmanager
    def full_parameters(self, model: nn.Module, trainable_only: bool = False) -> Iterator[None]:
        """Inside the block, on rank 0, `model` holds full plain CPU copies of its FSDP-sharded
        parameters (all, or the trainable ones), so the ordinary savers (lora.save,
        models.qwen.save, named_parameters) write the whole model; the shards come back after.
        A collective: every rank enters, only rank 0 may read the model inside."""
        if not self.fsdp:
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()   # an evaluation forward can leave the root unsharded
        full_of: dict[int, Optional[nn.Parameter]] = {}
        swapped = []
        with torch.no_grad():
            for module in model.modules():
                for name, p in list(module._parameters.items()):
                    if p is None or not is_dtensor(p) or (trainable_only and not p.requires_grad):
                        continue
                    if id(p) not in full_of:   # a shared (tied) parameter is gathered once
                        full = p.full_tensor()
                        full_of[id(p)] = nn.Parameter(full.cpu(), p.requires_grad) if self.is_main else None
                    if self.is_main:
                        module._parameters[name] = full_of[id(p)]
                        swapped.append((module, name, p))
        try:
            yield
        finally:
            for module, name, p in swapped:
                module._parameters[name] = p

    def shard_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """After optimizer.load_state_dict(full state): each state tensor shaped like its
        FSDP-sharded parameter becomes this rank's shard."""
        if not self.fsdp:
            return
        for p, state in optimizer.state.items():
            if not is_dtensor(p):
                continue
            for key, value in state.items():
                if torch.is_tensor(value) and not is_dtensor(value) and tuple(value.shape) == tuple(p.shape):
                    state[key] = shard_as(value, p)
