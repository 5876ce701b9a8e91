"""Process-group helpers. Everything works without ``torch.distributed`` being initialised
(one process, rank 0 of 1)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def default_timeout() -> datetime.timedelta:
    """Collective timeout: ``TRELLIS_DIST_TIMEOUT`` seconds (default 1800). A dead rank ends the
    job with an error after this long instead of hanging forever."""
    return datetime.timedelta(seconds=float(os.environ.get("TRELLIS_DIST_TIMEOUT", "1800")))


def init_process_group(info: DistInfo, master_addr: str, master_port: int) -> None:
    """Initialises the default group (gloo on CPU, NCCL on CUDA) when world_size > 1."""
    if info.world_size <= 1 or dist.is_initialized():
        return
    backend = "nccl" if info.device.type == "cuda" else "gloo"
    os.environ.setdefault("MASTER_ADDR", master_addr)
    os.environ.setdefault("MASTER_PORT", str(master_port))
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        kwargs["device_id"] = info.device
    dist.init_process_group(
        backend=backend, init_method="env://", rank=info.rank, world_size=info.world_size,
        timeout=default_timeout(), **kwargs,
    )


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks (returns a new tensor; ``t`` is unchanged)."""
    if not dist.is_initialized():
        return t.clone()
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if not dist.is_initialized():
        return t.clone()
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_gather_object(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
