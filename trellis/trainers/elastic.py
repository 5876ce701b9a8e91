"""``LinearMemoryController``: elastic activation checkpointing for the ``Elastic*`` models
(reference TRAINING.md 6.3).

The sparse models see a different number of voxels in every micro-batch. The controller fits a
linear model of the peak memory against the work ``input_size * mem_ratio``,

    peak_GiB = k * input_size * mem_ratio + b,

and before each forward picks the largest ``mem_ratio`` (share of transformer blocks *not*
checkpointed) that keeps the peak under ``target_ratio * available_memory``:

    k == 0 (no fit yet):  mem_ratio = U(0, 1) * max_ratio   (explores; max_ratio starts at
                          ``max_mem_ratio_start`` and grows by 0.1 per refit, up to 1)
    otherwise:            mem_ratio = clip((available * target - b) / (k * input_size), 0, max_ratio)

Engine protocol (``Trainer.run_step``)::

    controller.attach(models, device)           # once
    with controller.record():                   # each micro-batch, around forward AND backward
        ... trainer.training_losses(...)        # calls controller.set_input_size(n) before the forward
        ... backward
    controller.log()                            # once per step: means over its micro-batches

On a device without CUDA memory statistics (the CPU) the controller is a no-op: ``set_input_size``
applies nothing and ``log()`` is empty. Unlike the original, ``state_dict`` keeps the whole state
(buffers, counters, ``max_ratio``, the exploration RNG), so a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

__all__ = ["LinearMemoryController", "MemoryProbe", "CudaMemoryProbe"]


class MemoryProbe(Protocol):
    def reset(self) -> None: ...

    def peak_gib(self) -> float: ...


class CudaMemoryProbe:
    """Peak allocated memory of one CUDA device, in GiB."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float:
        return torch.cuda.max_memory_allocated(self.device) / 2 ** 30


class LinearMemoryController:
    """Args (as the original):
        buffer_size: ring-buffer length of the (memory, input_size, ratio) records.
        update_every: micro-batches between refits (each refit also raises ``max_ratio`` by 0.1).
        target_ratio: share of ``available_memory`` the peak should stay under.
        available_memory: GiB; default the device's total memory.
        max_mem_ratio_start: initial cap on ``mem_ratio``.
    """

    def __init__(self, buffer_size: int = 1000, update_every: int = 500, target_ratio: float = 0.8,
                 available_memory: float | None = None, max_mem_ratio_start: float = 0.1):
        if buffer_size < 2 or update_every < 1:
            raise ValueError(f"LinearMemoryController: buffer_size >= 2 and update_every >= 1 needed, "
                             f"got {buffer_size}, {update_every}")
        if not 0 < target_ratio <= 1 or not 0 <= max_mem_ratio_start <= 1:
            raise ValueError("LinearMemoryController: target_ratio must be in (0, 1] and max_mem_ratio_start in [0, 1]")
        self.buffer_size = int(buffer_size)
        self.update_every = int(update_every)
        self.target_ratio = float(target_ratio)
        self.available_memory = available_memory
        self.max_mem_ratio = float(max_mem_ratio_start)
        self.params = (0.0, 0.0)  # (k, b)
        self.memory: list[float] = []
        self.input_sizes: list[int] = []
        self.mem_ratios: list[float] = []
        self.num_records = 0
        self._rng = np.random.default_rng(0)
        self.models: list[nn.Module] = []
        self.probe: MemoryProbe | None = None
        self._recording = False
        self._current: tuple[int, float] | None = None  # (input_size, mean exact ratio) of this micro-batch
        self._step_logs: list[dict[str, float]] = []

    # ------------------------------------------------------------------ engine protocol
    def attach(self, models: dict[str, nn.Module], device: torch.device,
               probe: MemoryProbe | None = None) -> None:
        """Finds the elastic models (those with ``set_mem_ratio``). Enabled on CUDA, or with a given
        ``probe`` (tests); otherwise a no-op."""
        self.models = [m for m in models.values() if hasattr(m, "set_mem_ratio")]
        if probe is None and device.type == "cuda" and self.models:
            probe = CudaMemoryProbe(device)
            if self.available_memory is None:
                self.available_memory = torch.cuda.get_device_properties(device).total_memory / 2 ** 30
        self.probe = probe if self.models else None
        if self.probe is not None and self.available_memory is None:
            raise ValueError("LinearMemoryController: available_memory must be given with a custom memory probe")

    @property
    def enabled(self) -> bool:
        return self.probe is not None

    @contextlib.contextmanager
    def record(self) -> Iterator[None]:
        """Spans one micro-batch's forward and backward: resets the peak counter, then records
        (peak GiB, input size, exact ratio) and puts the models back to their own setting."""
        if not self.enabled:
            yield
            return
        self.probe.reset()
        self._recording = True
        self._current = None
        try:
            yield
        finally:
            self._recording = False
            for m in self.models:
                m.reset_mem_ratio()
        if self._current is not None:
            self._add_record(self.probe.peak_gib(), *self._current)

    def set_input_size(self, input_size: int) -> float:
        """Chooses and applies the memory ratio for a micro-batch of ``input_size`` rows (call it before
        the forward, inside ``record``). Returns the mean exact ratio applied (1.0 when disabled)."""
        if not self.enabled or not self._recording:
            return 1.0
        if self._current is not None and self._current[0] != int(input_size):
            raise RuntimeError(f"LinearMemoryController: elastic models report different input sizes in one "
                               f"micro-batch ({self._current[0]} and {input_size})")
        ratio = self.mem_ratio_for(int(input_size))
        exact = [float(m.set_mem_ratio(ratio)) for m in self.models]
        self._current = (int(input_size), float(np.mean(exact)))
        return self._current[1]

    def mem_ratio_for(self, input_size: int) -> float:
        """The requested ratio (before rounding to whole blocks)."""
        k, b = self.params
        if k == 0:
            return float(self._rng.uniform(0.0, 1.0)) * self.max_mem_ratio
        avail = float(self.available_memory) * self.target_ratio
        return float(np.clip((avail - b) / (k * max(input_size, 1)), 0.0, self.max_mem_ratio))

    def log(self) -> dict[str, float]:
        """Means over the micro-batches recorded since the last call (empty when disabled)."""
        logs, self._step_logs = self._step_logs, []
        if not logs:
            return {}
        out = {key: float(np.mean([entry[key] for entry in logs])) for key in logs[0]}
        out["params/k"], out["params/b"] = self.params
        return out

    # ------------------------------------------------------------------ fitting
    def _add_record(self, memory: float, input_size: int, ratio: float) -> None:
        self.memory.append(memory)
        self.input_sizes.append(input_size)
        self.mem_ratios.append(ratio)
        if len(self.memory) > self.buffer_size:
            del self.memory[0], self.input_sizes[0], self.mem_ratios[0]
        self._step_logs.append({"memory": memory, "input_size": float(input_size), "mem_ratio": ratio})
        self.num_records += 1
        if self.num_records % self.update_every == 0:
            self.max_mem_ratio = min(1.0, self.max_mem_ratio + 0.1)
            self.fit()

    def fit(self) -> None:
        """Least-squares line of memory against ``input_size * mem_ratio`` over the buffer (kept as is
        when the buffer cannot determine a slope)."""
        x = np.asarray(self.input_sizes, dtype=np.float64) * np.asarray(self.mem_ratios, dtype=np.float64)
        y = np.asarray(self.memory, dtype=np.float64)
        if len(x) < 2 or np.ptp(x) == 0:
            return
        k, b = np.polyfit(x, y, 1)
        self.params = (float(k), float(b))

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {"params": self.params, "memory": list(self.memory), "input_size": list(self.input_sizes),
                "mem_ratio": list(self.mem_ratios), "num_records": self.num_records,
                "max_mem_ratio": self.max_mem_ratio, "rng": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Accepts the original's ``{params: (k, b)}`` too (the rest then restarts)."""
        self.params = tuple(float(v) for v in state["params"])
        self.memory = list(state.get("memory", []))
        self.input_sizes = list(state.get("input_size", []))
        self.mem_ratios = list(state.get("mem_ratio", []))
        self.num_records = int(state.get("num_records", 0))
        self.max_mem_ratio = float(state.get("max_mem_ratio", self.max_mem_ratio))
        if "rng" in state:
            self._rng.bit_generator.state = state["rng"]
