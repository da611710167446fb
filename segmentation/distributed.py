"""A process's place in a torchrun job and its device: shared by training and evaluation."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from converter.errors import CaffeError


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (world 1, rank 0 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> Dist:
    """Join the torchrun job described by the environment (NCCL on CUDA, gloo on CPU), if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def leave_distributed() -> None:
    """Tear the process group down before the process exits: a gloo rank that exits with its group
    alive can abort ("terminate called without an active exception") and fail the whole job."""
    if dist.is_initialized():
        dist.destroy_process_group()


def resolve_device(name: str, place: Dist) -> torch.device:
    """'auto' is CUDA when available; a CUDA device under torchrun is the rank's local GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CaffeError(f"unknown device {name!r} (cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CaffeError(f"device {name!r} requested but CUDA is not available")
        if place.world_size > 1:
            device = torch.device("cuda", place.local_rank)
    return device
