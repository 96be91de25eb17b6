"""Process-group set-up for runs launched by torchrun (``tune run --nproc_per_node N ...``).

A run is distributed when torchrun's environment (``WORLD_SIZE``) says so; the backend follows the
device (NCCL on CUDA, gloo on CPU). Collective timeouts are finite so a dead rank ends the job with an
error instead of hanging it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str, timeout_s: float = 600.0) -> DistributedInfo:
    """Initialise the default process group when launched by torchrun; a no-op otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedInfo()
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return DistributedInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def resolve_device(device: str, info: DistributedInfo) -> torch.device:
    """``cuda`` becomes ``cuda:<local_rank>`` under torchrun; ``cpu`` stays ``cpu``."""
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("config asks for device=cuda but CUDA is not available")
        torch.cuda.set_device(info.local_rank)
        return torch.device("cuda", info.local_rank)
    return torch.device(device)


def all_reduce_gradients(parameters: list[torch.nn.Parameter]) -> None:
    """SUM-reduce ``.grad`` across ranks (the loss is already normalised by the GLOBAL token count,
    so the sum is the gradient of the global mean). One flat buffer: one collective per step."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
