"""Gradient clipping and learning-rate helpers referenced by name from configs."""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR


class AdaptiveGradClipper:
    """Clips the total gradient norm to a running percentile of recent norms.

    Each call clips with the current threshold ``T`` (``max_norm`` at first; infinity if None) and
    returns the *pre-clip* total norm ``g``. Finite norms go into a ring buffer of ``buffer_size``;
    once it is full, ``T = min(percentile(buffer, clip_percentile), max_norm)`` after every finite
    call, so a new threshold applies from the next step.
    """

    def __init__(self, max_norm: float | None = None, clip_percentile: float = 95.0, buffer_size: int = 1000):
        if not 0 < clip_percentile <= 100:
            raise ValueError(f"AdaptiveGradClipper: clip_percentile must be in (0, 100], got {clip_percentile}")
        if buffer_size < 1:
            raise ValueError(f"AdaptiveGradClipper: buffer_size must be >= 1, got {buffer_size}")
        self.max_norm = max_norm
        self.clip_percentile = clip_percentile
        self.buffer_size = buffer_size
        self._grad_norm = np.zeros(buffer_size, dtype=np.float32)
        self._max_norm = float("inf") if max_norm is None else float(max_norm)
        self._buffer_ptr = 0
        self._buffer_length = 0

    @property
    def threshold(self) -> float:
        return self._max_norm

    def state_dict(self) -> dict:
        return {
            "grad_norm": torch.from_numpy(self._grad_norm.copy()),
            "max_norm": self._max_norm,
            "buffer_ptr": self._buffer_ptr,
            "buffer_length": self._buffer_length,
        }

    def load_state_dict(self, state: dict) -> None:
        grad_norm = np.asarray(state["grad_norm"], dtype=np.float32)
        if grad_norm.shape != (self.buffer_size,):
            raise ValueError(f"AdaptiveGradClipper: saved buffer has {grad_norm.shape[0]} slots, config has {self.buffer_size}")
        self._grad_norm = grad_norm.copy()
        self._max_norm = float(state["max_norm"])
        self._buffer_ptr = int(state["buffer_ptr"])
        self._buffer_length = int(state["buffer_length"])

    def record(self, norm: float) -> None:
        """Feeds one pre-clip norm to the buffer (non-finite norms are ignored)."""
        if not np.isfinite(norm):
            return
        self._grad_norm[self._buffer_ptr] = norm
        self._buffer_ptr = (self._buffer_ptr + 1) % self.buffer_size
        self._buffer_length = min(self._buffer_length + 1, self.buffer_size)
        if self._buffer_length == self.buffer_size:
            t = float(np.percentile(self._grad_norm, self.clip_percentile))
            self._max_norm = t if self.max_norm is None else min(t, float(self.max_norm))

    def __call__(self, parameters: Iterable[torch.Tensor]) -> torch.Tensor:
        norm = torch.nn.utils.clip_grad_norm_(list(parameters), self._max_norm, foreach=True)
        self.record(float(norm))
        return norm


def LinearWarmupLRScheduler(optimizer: torch.optim.Optimizer, warmup_steps: int) -> LambdaLR:
    """LR factor ``(step + 1) / warmup_steps`` below ``warmup_steps``, 1 after."""
    if warmup_steps < 1:
        raise ValueError(f"LinearWarmupLRScheduler: warmup_steps must be >= 1, got {warmup_steps}")
    return LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup_steps))
