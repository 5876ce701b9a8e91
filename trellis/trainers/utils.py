"""Gradient clipping and learning-rate helpers referenced by name from configs."""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR


def total_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """2-norm over every tensor of ``grads`` (float32 scalar on their device; 0 when empty). No host sync."""
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads, 2.0)
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]), 2.0)


class AdaptiveGradClipper:
    """Clips the total gradient norm to a running percentile of recent norms.

    Each call clips with the current threshold ``T`` (``max_norm`` at first; infinity if None) and
    returns the *pre-clip* total norm ``g``. Finite norms go into a ring buffer of ``buffer_size``;
    once it is full, ``T = min(percentile(buffer, clip_percentile), max_norm)`` after every finite
    call, so a new threshold applies from the next step.

    The buffer and the threshold live on the gradients' device and are updated there: a call never
    waits for the GPU (``threshold`` and ``state_dict`` do).
    """

    def __init__(self, max_norm: float | None = None, clip_percentile: float = 95.0, buffer_size: int = 1000):
        if not 0 < clip_percentile <= 100:
            raise ValueError(f"AdaptiveGradClipper: clip_percentile must be in (0, 100], got {clip_percentile}")
        if buffer_size < 1:
            raise ValueError(f"AdaptiveGradClipper: buffer_size must be >= 1, got {buffer_size}")
        self.max_norm = max_norm
        self.clip_percentile = clip_percentile
        self.buffer_size = buffer_size
        cap = float("inf") if max_norm is None else float(max_norm)
        # float64 state: the percentile and the cap are computed as numpy did before (float32 buffer values)
        self._grad_norm = torch.zeros(buffer_size, dtype=torch.float32)
        self._max_norm = torch.tensor(cap, dtype=torch.float64)
        self._buffer_ptr = torch.zeros((), dtype=torch.long)
        self._buffer_length = torch.zeros((), dtype=torch.long)

    def _to(self, device: torch.device) -> None:
        if self._grad_norm.device != device:
            self._grad_norm, self._max_norm, self._buffer_ptr, self._buffer_length = (
                t.to(device) for t in (self._grad_norm, self._max_norm, self._buffer_ptr, self._buffer_length))

    @property
    def threshold(self) -> float:
        """The current threshold (waits for the device)."""
        return float(self._max_norm)

    @property
    def threshold_tensor(self) -> torch.Tensor:
        """The current threshold as a scalar tensor on the gradients' device (no wait)."""
        return self._max_norm

    def state_dict(self) -> dict:
        return {
            "grad_norm": self._grad_norm.detach().cpu().clone(),
            "max_norm": float(self._max_norm),
            "buffer_ptr": int(self._buffer_ptr),
            "buffer_length": int(self._buffer_length),
        }

    def load_state_dict(self, state: dict) -> None:
        grad_norm = torch.as_tensor(np.asarray(state["grad_norm"], dtype=np.float32))
        if grad_norm.shape != (self.buffer_size,):
            raise ValueError(f"AdaptiveGradClipper: saved buffer has {grad_norm.shape[0]} slots, config has {self.buffer_size}")
        device = self._grad_norm.device
        self._grad_norm = grad_norm.clone().to(device)
        self._max_norm = torch.tensor(float(state["max_norm"]), dtype=torch.float64, device=device)
        self._buffer_ptr = torch.tensor(int(state["buffer_ptr"]), dtype=torch.long, device=device)
        self._buffer_length = torch.tensor(int(state["buffer_length"]), dtype=torch.long, device=device)

    def record(self, norm: torch.Tensor | float) -> None:
        """Feeds one pre-clip norm to the buffer (non-finite norms are ignored); stays on the device."""
        norm = torch.as_tensor(norm, dtype=torch.float32, device=self._grad_norm.device).reshape(())
        ok = torch.isfinite(norm)
        slot = self._buffer_ptr.reshape(1)
        self._grad_norm.index_copy_(0, slot, torch.where(ok, norm, self._grad_norm.index_select(0, slot)[0]).reshape(1))
        self._buffer_ptr = torch.where(ok, (self._buffer_ptr + 1) % self.buffer_size, self._buffer_ptr)
        self._buffer_length = torch.where(ok, (self._buffer_length + 1).clamp(max=self.buffer_size),
                                          self._buffer_length)
        t = torch.quantile(self._grad_norm.double(), self.clip_percentile / 100.0)
        if self.max_norm is not None:
            t = t.clamp(max=float(self.max_norm))
        self._max_norm = torch.where(ok & (self._buffer_length == self.buffer_size), t, self._max_norm)

    def __call__(self, parameters: Iterable[torch.Tensor]) -> torch.Tensor:
        grads = [p.grad for p in parameters if p.grad is not None]
        if not grads:
            return torch.zeros(())
        self._to(grads[0].device)
        norm = total_grad_norm(grads)
        # torch.nn.utils.clip_grad_norm_'s rule, with the threshold as a tensor
        coef = (self._max_norm / (norm.double() + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, coef.to(grads[0].dtype))
        self.record(norm)
        return norm


def LinearWarmupLRScheduler(optimizer: torch.optim.Optimizer, warmup_steps: int) -> LambdaLR:
    """LR factor ``(step + 1) / warmup_steps`` below ``warmup_steps``, 1 after."""
    if warmup_steps < 1:
        raise ValueError(f"LinearWarmupLRScheduler: warmup_steps must be >= 1, got {warmup_steps}")
    return LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup_steps))
