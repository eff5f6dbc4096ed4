"""DDP plumbing: the trainer runs unchanged under ``torchrun --nproc_per_node=N``.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; ``init_from_env``
starts the process group (gloo on CPU, nccl on GPU) when WORLD_SIZE > 1 and does nothing
otherwise. Every rank builds the same global batches (same seed, same shuffle) and takes a
disjoint share of each (``PreparedDataset.iter_batches(rank=, world_size=)``); rank 0 alone
evaluates and writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device: torch.device) -> DistInfo:
    """Join the process group described by torchrun's environment (no-op for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def broadcast_float(value: float, info: DistInfo, device: torch.device) -> float:
    """Rank 0's ``value`` on every rank (used for the validation AUC that drives early stopping)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return float(t.item())


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean_grads(params, info: DistInfo) -> None:
    """Sum every ``.grad`` across ranks (each rank's loss carries its share's weight, so the sum is
    the gradient of the whole batch's mean loss); a rank without a gradient contributes zeros."""
    if not info.enabled:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)


def shard(n: int, info: DistInfo) -> torch.Tensor | None:
    """This rank's rows of ``n`` (``rank::world_size``), or None for one process."""
    if not info.enabled:
        return None
    return torch.arange(info.rank, n, info.world_size)
