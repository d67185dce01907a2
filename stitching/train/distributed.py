"""Process-group set-up for ``torchrun`` (NCCL on GPUs, gloo on CPU) and small collective helpers."""

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
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init(device_kind: str) -> DistInfo:
    """Join the process group ``torchrun`` describes in the environment (a no-op for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device_kind == "cuda":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return DistInfo(rank, world, local)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(values: list[float], device: torch.device, info: DistInfo) -> list[float]:
    """Sum a few numbers over ranks (float64)."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_sum_tensor(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a device tensor over ranks in place (no host sync: read it when the figures are needed)."""
    if info.enabled:
        dist.all_reduce(t)
    return t


def all_max(value: float, device: torch.device, info: DistInfo) -> float:
    """The largest of one number over ranks (the trainer agrees on a stop signal with it every
    ``train.preempt_check_every`` steps, :mod:`stitching.train.stop`); a host sync."""
    if not info.enabled:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def broadcast_module(module: torch.nn.Module, info: DistInfo) -> None:
    """Rank 0's parameters and buffers of ``module`` on every rank, in place."""
    if not info.enabled:
        return
    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t.data, src=0)


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` (picklable) on every rank (a collective: call on all ranks)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_min(value: float, device: torch.device, info: DistInfo) -> float:
    """The smallest of one number over ranks."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t.item()
