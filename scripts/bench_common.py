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


def gpu_kernels(prof):
    """The GPU kernel events of a ``torch.profiler`` profile. GPU-side user annotations (e.g.
    ``Optimizer.step#AdamW.step``, the span of the optimizer's kernels) are not kernels: left out."""
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA or ev.device_time_total <= 0:
            continue
        if getattr(ev, "is_user_annotation", False):
            continue
        yield ev


def profiled_kernels(fn: Callable[[], object]) -> list:
    """The GPU kernel events (``gpu_kernels``) of one call of ``fn``, in launch order."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sorted(gpu_kernels(prof), key=lambda ev: ev.time_range.start)


def kernel_time_ms(fn: Callable[[], object], reps: int = 3) -> float:
    """Median over ``reps`` profiled calls (after one unprofiled) of the summed durations of the GPU
    kernels ``fn()`` launches: the device's share of a call, without the host's launch time (which a
    training step hides behind the GPU work queued before it, but a lone call's CUDA-event time
    includes)."""
    fn()
    return statistics.median(sum(ev.device_time_total for ev in profiled_kernels(fn)) / 1e3 for _ in range(reps))


def copy_bandwidth_tbs(device: torch.device | str = "cuda", mib: int = 512, reps: int = 20) -> float:
    """Measured rate of a contiguous device-to-device copy of ``mib`` MiB, TB/s (bytes read + written)."""
    src = torch.empty(mib << 20, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), reps=reps, warmup=3)
    return 2 * src.numel() / ms / 1e9
