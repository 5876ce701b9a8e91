"""Timing helpers shared by the ``scripts/bench_*.py`` benchmarks (conventions of BENCHMARKING.md:
CUDA events after warm-up, median of the repetitions, the card's measured bf16 matmul peak)."""

from __future__ import annotations

import statistics
from typing import Callable

import torch


def cuda_time_ms(fn: Callable[[], object], reps: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` timed with CUDA events, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bf16_peak_tflops(device: torch.device | str = "cuda", reps: int = 20) -> float:
    """Measured rate of a bf16 8192^3 matmul on random operands, TFLOP/s."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = cuda_time_ms(lambda: a @ b, reps=reps, warmup=5)
    return 2 * 8192 ** 3 / ms / 1e9
