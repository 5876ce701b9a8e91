"""Host-to-device copies that do not stop the host.

``cpu_tensor.to("cuda")`` from ordinary (pageable) memory waits until the copy is done, and so until
every kernel queued before it has finished: one such copy in a training step keeps the host from
running ahead of the GPU. Copies from pinned memory with ``non_blocking=True`` are queued like kernels.
"""

from __future__ import annotations

import torch

__all__ = ["to_device_async"]


def to_device_async(x: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x.to(device, dtype)`` without a host sync for a small CPU tensor going to CUDA.

    The CPU tensor is copied into pinned memory first (PyTorch's caching host allocator keeps that
    buffer alive until the copy has run), so the caller may reuse or modify ``x`` afterwards.
    Other combinations (CPU to CPU, already on the device) are plain ``Tensor.to``.
    """
    device = torch.device(device)
    if device.type == "cuda" and x.device.type == "cpu":
        if dtype is not None:
            x = x.to(dtype)
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device=device, dtype=dtype) if dtype is not None else x.to(device)
