"""Attention micro-benchmarks: sparse swin / full / cross attention per backend vs dense SDPA.

Conventions: /work/shared/BENCHMARKING.md. CUDA-event timing after warm-up, median of ``--reps``.
Forward FLOPs: self-attention 4 * L^2 * C per sequence (per window for swin), cross 4 * Lq * Lkv * C;
fwd+bwd counts 3x the forward. Only the attention core is timed (no q/k/v/out projections); q, k and
v are views of one ``[N, 3, H, d]`` projection output, as in the layers.

    python scripts/bench_attention.py                 # all cases, every available backend
    python scripts/bench_attention.py --cases swin8_shells --json out.json

``CASES`` is a list of ``(name, builder)``; ``scripts/bench_sparse.py`` can import and run it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import (  # noqa: E402
    bf16_peak_tflops,
    copy_bandwidth_tbs,
    cuda_time_ms,
    kernel_time_ms,
    profiled_kernels,
)

from trellis.modules.attention.backend import backend_unavailable_reason  # noqa: E402
from trellis.modules.attention.varlen import (  # noqa: E402
    VarlenPlan,
    attention_with_plan,
    packed_attention_with_plan,
)
from trellis.modules.sparse import SparseTensor  # noqa: E402
from trellis.modules.sparse.attention import full_plan, window_plan  # noqa: E402

DEVICE = "cuda"  # "cpu" with --smoke
SMOKE = False
MANY_SEQS = 512  # torch_seq rows are skipped above this many sequences (swin windows)
VARLEN_BACKENDS = ("torch", "torch_varlen", "flash_attn", "xformers", "triton", "torch_seq")


# ----------------------------------------------------------------------------- workloads
def superellipsoid(res: int, gen: torch.Generator) -> torch.Tensor:
    """Inside of one random superellipsoid on a ``res^3`` grid -> ``[R, R, R]`` bool (BENCHMARKING.md)."""
    ax = torch.arange(res, dtype=torch.float32) + 0.5
    X, Y, Z = torch.meshgrid(ax, ax, ax, indexing="ij")
    ctr = res * (0.4 + 0.2 * torch.rand(3, generator=gen))
    rad = res * (0.25 + 0.15 * torch.rand(3, generator=gen))
    p = 2.0 + 2.0 * float(torch.rand(1, generator=gen))
    inside = ((X - ctr[0]).abs() / rad[0]) ** p + ((Y - ctr[1]).abs() / rad[1]) ** p \
        + ((Z - ctr[2]).abs() / rad[2]) ** p <= 1
    return inside


def surface(inside: torch.Tensor) -> torch.Tensor:
    """Voxels of ``inside`` ``[R, R, R]`` bool with at least one empty 6-neighbour -> ``[R, R, R]`` bool."""
    p = F.pad(inside[None, None].float(), (1, 1, 1, 1, 1, 1))[0, 0].bool()  # [R+2, R+2, R+2]
    c = slice(1, -1)
    interior = (p[2:, c, c] & p[:-2, c, c] & p[c, 2:, c] & p[c, :-2, c] & p[c, c, 2:] & p[c, c, :-2])
    return inside & ~interior


def objects(batch: int, shells_per_object: int, res: int = 64, seed: int = 0) -> torch.Tensor:
    """``[N, 4]`` int32 coords of ``batch`` objects, each the union of ``shells_per_object`` shells."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(batch):
        surf = torch.zeros(res, res, res, dtype=torch.bool)
        for _ in range(shells_per_object):
            surf |= surface(superellipsoid(res, gen))
        xyz = torch.nonzero(surf)
        rows.append(torch.cat([torch.full((xyz.shape[0], 1), b), xyz], dim=1))
    return torch.cat(rows).int()


# ----------------------------------------------------------------------------- timing
def cuda_median_ms(fn: Callable[[], object], warmup: int, reps: int) -> float:
    """``bench_common.cuda_time_ms``; wall-clock median on the CPU (smoke runs only)."""
    if DEVICE != "cpu":
        return cuda_time_ms(fn, reps, warmup)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def self_flops(lens: list[int], C: int) -> float:
    return sum(4.0 * n * n * C for n in lens)


class Timing(NamedTuple):
    """Forward and forward+backward ms by CUDA events; ``kernel_ms``: the same two as GPU kernel time
    (``--kernel-time``), else None."""

    fwd_ms: float
    fwd_bwd_ms: float
    kernel_ms: tuple[float, float] | None = None


def _time_pair(fwd: Callable[[], object], fwd_bwd: Callable[[], object], args) -> Timing:
    """``Timing`` of a forward and a forward+backward; ``--kernel-breakdown`` prints the latter's kernels."""
    kernel_ms = (kernel_time_ms(fwd), kernel_time_ms(fwd_bwd)) if args.kernel_time and not SMOKE else None
    if args.kernel_breakdown and not SMOKE:
        _print_kernels(fwd_bwd)
    return Timing(cuda_median_ms(fwd, args.warmup, args.reps), cuda_median_ms(fwd_bwd, args.warmup, args.reps),
                  kernel_ms)


def _print_kernels(fn: Callable[[], object]) -> None:
    """One profiled call of ``fn``: each GPU kernel's duration, in launch order (``--kernel-breakdown``)."""
    fn()
    ks = profiled_kernels(fn)
    print("    kernels (us, launch order): " + " ".join(f"{e.name.strip('_')[:24]}:{e.device_time_total:.0f}" for e in ks))


def time_varlen(q, k, v, leaves: list, plan: VarlenPlan, backend: str, args) -> Timing:
    """``Timing`` of ``attention_with_plan``; gradients wrt ``leaves``."""
    g = torch.randn(q.shape, device=q.device, dtype=q.dtype)

    def fwd():
        with torch.no_grad():
            return attention_with_plan(q, k, v, plan, backend=backend)

    def fwd_bwd():
        out = attention_with_plan(q, k, v, plan, backend=backend)
        torch.autograd.grad(out, leaves, g)

    return _time_pair(fwd, fwd_bwd, args)


def time_dense(B: int, L: int, H: int, d: int, dtype, args, Lkv: int | None = None) -> Timing:
    """Dense SDPA ``[B, H, L, d]`` (flash / cuDNN chosen by torch)."""
    Lkv = L if Lkv is None else Lkv
    q = torch.randn(B, H, L, d, device=DEVICE, dtype=dtype, requires_grad=True)
    k = torch.randn(B, H, Lkv, d, device=DEVICE, dtype=dtype, requires_grad=True)
    v = torch.randn(B, H, Lkv, d, device=DEVICE, dtype=dtype, requires_grad=True)
    g = torch.randn_like(q)

    def fwd():
        with torch.no_grad():
            return F.scaled_dot_product_attention(q, k, v)

    def fwd_bwd():
        torch.autograd.grad(F.scaled_dot_product_attention(q, k, v), (q, k, v), g)

    return _time_pair(fwd, fwd_bwd, args)


def _row(case: str, backend: str, flops: float, timing: Timing, extra: str = "") -> dict:
    t_f, t_fb = timing.fwd_ms, timing.fwd_bwd_ms
    row = {"case": case, "backend": backend, "fwd_ms": t_f, "fwd_bwd_ms": t_fb,
           "fwd_tflops": flops / t_f / 1e9, "fwd_bwd_tflops": 3 * flops / t_fb / 1e9, "note": extra}
    if timing.kernel_ms is not None:  # --kernel-time: the same rates over the GPU kernel time alone
        k_f, k_fb = timing.kernel_ms
        row.update(fwd_kernel_ms=k_f, fwd_bwd_kernel_ms=k_fb, fwd_kernel_tflops=flops / k_f / 1e9,
                   fwd_bwd_kernel_tflops=3 * flops / k_fb / 1e9)
        row["note"] = " ".join(filter(None, (f"kernels: fwd {k_f:.3f} ms {row['fwd_kernel_tflops']:.1f} TF/s, "
                                             f"fwd+bwd {k_fb:.3f} ms {row['fwd_bwd_kernel_tflops']:.1f} TF/s", extra)))
    return row


def _backends(dtype, args) -> list[str]:
    out = []
    for b in args.backends:
        reason = backend_unavailable_reason(b, torch.device(DEVICE), dtype, varlen=True)
        if reason is None:
            out.append(b)
        else:
            print(f"  skip {b}: {reason}")
    return out


def _triton_configs(args) -> list[tuple | None]:
    """Long-path block overrides from ``--triton-configs`` (None: each variant's own blocks)."""
    if not args.triton_configs:
        return [None]
    return [tuple(int(v) for v in c.split(",")) for c in args.triton_configs]


def _triton_runs(plan: VarlenPlan, args) -> list[tuple[str, str, tuple | None]]:
    """(row label, variant, long-path config) for each Triton row of a case, then the packed rows.

    Variants other than "old" and the default are skipped where their window path would take no
    sequence of the plan (they would time the same kernels as "old").
    """
    from trellis.modules.attention import triton_varlen as tv

    names = args.triton_variants if args.triton_variants else list(tv.VARIANTS)
    runs = []
    for name in names:
        if name not in tv.VARIANTS:
            raise SystemExit(f"unknown --triton-variants entry {name!r}; known: {', '.join(tv.VARIANTS)}")
        buckets = tv.VARIANTS[name]["window"]["buckets"]
        top = max((b[0] for b in buckets), default=0)
        if name not in ("old", tv.DEFAULT_VARIANT) and not any(max(a, b) <= top for a, b in
                                                                zip(plan.lens_q, plan.lens_kv)):
            continue
        for cfg in _triton_configs(args):
            runs.append((f"triton[{name}]", name, cfg))
    if args.packed:  # the packed entry point: for each variant named with --triton-variants, else the default
        for name in (args.triton_variants or [tv.DEFAULT_VARIANT]):
            if any(label == f"triton[{name}]" for label, _, _ in runs):
                runs.append((f"triton[{name},packed]", name, None))
    return runs


def _set_triton(variant: str, cfg: tuple | None) -> str:
    """Switch the Triton kernels to ``variant`` (and long-path blocks ``cfg``); returns the row note."""
    from trellis.modules.attention import triton_varlen as tv

    tv.use_variant(variant)
    if cfg is None:
        return ""
    tv.BLOCK_CONFIG.update({"fwd": cfg[0:3], "bwd_kv": cfg[3:6], "bwd_q": cfg[6:9],
                            "bwd_fused": cfg[9:12] if len(cfg) == 12 else (64, 64, 4)})
    tv.BLOCK_CONFIG_16BIT_D64.update({"fwd": cfg[0:3], "bwd_kv": cfg[3:6], "bwd_q": cfg[6:9]})
    return "cfg=" + ",".join(map(str, cfg))


def time_packed(qkv, plan: VarlenPlan, args, backend: str = "triton") -> Timing:
    """Like ``time_varlen`` through ``packed_attention_with_plan`` (the gradient of qkv is one buffer)."""
    g = torch.randn(qkv.shape[0], *qkv.shape[2:], device=qkv.device, dtype=qkv.dtype)

    def fwd():
        with torch.no_grad():
            return packed_attention_with_plan(qkv, plan, backend=backend)

    def fwd_bwd():
        torch.autograd.grad(packed_attention_with_plan(qkv, plan, backend=backend), [qkv], g)

    return _time_pair(fwd, fwd_bwd, args)


def _check_ref(qkv: torch.Tensor, plan: VarlenPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output gradient, float32 reference output, its qkv gradient) of the ``torch`` backend."""
    leaf = qkv.detach().float().requires_grad_(True)
    out = attention_with_plan(*leaf.unbind(1), plan, backend="torch")
    g = torch.randn_like(out)
    return g, out.detach(), torch.autograd.grad(out, [leaf], g)[0]


def _check_note(qkv: torch.Tensor, plan: VarlenPlan, backend: str, packed: bool, ref) -> str:
    """Relative error of one row's output and qkv gradient against ``ref`` (``_check_ref``)."""
    g, ref_out, ref_grad = ref
    out = (packed_attention_with_plan(qkv, plan, backend=backend) if packed
           else attention_with_plan(*qkv.unbind(1), plan, backend=backend))
    grad = torch.autograd.grad(out, [qkv], g.to(out.dtype))[0]

    def rel(a, b):
        return ((a.float() - b).norm() / b.norm()).item()

    return f"err o={rel(out, ref_out):.1e} d={rel(grad, ref_grad):.1e}"


def _time_rows(name: str, qkv: torch.Tensor, plan: VarlenPlan, flops: float, args, suffix: str = "") -> list[dict]:
    """One row per backend (and Triton variant) of self-attention over ``qkv [N, 3, H, d]``."""
    q, k, v = qkv.unbind(1)
    ref = _check_ref(qkv, plan) if args.check else None
    rows = []
    for backend in _backends(qkv.dtype, args):
        if backend == "torch_seq" and plan.num_seqs > MANY_SEQS and not SMOKE:
            print(f"  torch_seq skipped: one SDPA call per sequence, {plan.num_seqs} sequences "
                  f"(measured 2026-11-26: 55-94 ms per call on the swin cases, 0.1-0.5 TFLOP/s)")
            continue
        runs = _triton_runs(plan, args) if backend == "triton" else [(backend, None, None)]
        if backend == "torch_seq" and args.packed:
            runs.append(("torch_seq[packed]", None, None))
        for label, variant, cfg in runs:
            note = _set_triton(variant, cfg) if variant is not None else ""
            packed = label.endswith("packed]")
            be = ("torch_seq" if label.startswith("torch_seq") else "triton") if packed else backend
            try:
                if packed:
                    timing = time_packed(qkv, plan, args, be)
                else:
                    timing = time_varlen(q, k, v, [qkv], plan, backend, args)
                if ref is not None:
                    note = " ".join(filter(None, (note, _check_note(qkv, plan, be, packed, ref))))
            except (RuntimeError, ValueError) as e:  # report and continue with the other backends
                print(f"  {label}{suffix} {note} failed: {type(e).__name__}: {str(e)[:300]}")
                continue
            finally:
                if variant is not None:
                    _set_triton(_default_variant(), None)
            rows.append(_row(name, label + suffix, flops, timing, note))
            print(_fmt(rows[-1]))
    return rows


def _copy_rates(qkv: torch.Tensor, index: torch.Tensor, args) -> None:
    """Prints the rate of copying the qkv rows through the row index and contiguously (a bandwidth scale)."""
    src = qkv.detach()
    moved = 2 * src.numel() * src.element_size()  # read + write
    for label, fn in (("gathered (index_select)", lambda: src.index_select(0, index)), ("contiguous", src.clone)):
        ms = cuda_median_ms(fn, args.warmup, args.reps)
        print(f"  copy of the qkv rows, {label}: {ms:.3f} ms, {moved / ms / 1e9:.2f} TB/s")


def _print_roofline(N: int, C: int, H: int, size: int, flops: float, args) -> None:
    """The fastest any kernel could run self-attention over N rows that must come from and go to memory,
    at the measured copy rate: forward reads q, k, v and writes the output and the LSE (4 bytes per row
    and head); backward reads q, k, v, dO and the LSE and writes dq, dk, dv (delta from P and dP, so no
    read of the output). Both ignore the row index and any re-read."""
    if args.bandwidth is None:
        args.bandwidth = copy_bandwidth_tbs(DEVICE) if not SMOKE else float("nan")
    bw = args.bandwidth * 1e12
    fwd_b = N * (4 * C * size + 4 * H)
    bwd_b = N * (7 * C * size + 4 * H)
    t_f, t_fb = fwd_b / bw * 1e3, (fwd_b + bwd_b) / bw * 1e3
    print(f"  roofline at the measured copy rate {args.bandwidth:.2f} TB/s: fwd {fwd_b / 1e6:.0f} MB, >= {t_f:.3f} ms "
          f"(<= {flops / t_f / 1e9:.0f} TF/s); fwd+bwd {(fwd_b + bwd_b) / 1e6:.0f} MB, >= {t_fb:.3f} ms "
          f"(<= {3 * flops / t_fb / 1e9:.0f} TF/s)")


def run_varlen_case(name: str, coords: torch.Tensor, plan_fn, C: int, H: int, args, dense_L: int | None) -> list[dict]:
    dtype = torch.bfloat16
    x = SparseTensor(torch.zeros(coords.shape[0], 1, device=DEVICE), coords.to(DEVICE))
    plan = plan_fn(x)
    lens = plan.lens_q
    flops = self_flops(lens, C)
    d = C // H
    N = coords.shape[0]
    print(f"[{name}] N={N} seqs={plan.num_seqs} mean_len={N / max(1, plan.num_seqs):.1f} max_len={plan.max_q} "
          f"fwd GFLOP={flops / 1e9:.2f}")
    qkv = torch.randn(N, 3, H, d, device=DEVICE, dtype=dtype, requires_grad=True)
    if args.roofline:
        _print_roofline(N, C, H, qkv.element_size(), flops, args)
    rows = _time_rows(name, qkv, plan, flops, args)
    if args.window_order and plan.index_q is not None:
        # the same sequences with their rows already in sequence order: no row index to gather through
        index = plan.index_q.to(DEVICE)
        _copy_rates(qkv, index, args)
        ordered = qkv.detach().index_select(0, index).requires_grad_(True)
        rows += _time_rows(name, ordered, VarlenPlan(plan.cu_q), flops, args, suffix="@ordered")
    if dense_L is not None:
        B = max(1, round(N / dense_L))
        rows.append(_row(name, f"dense_sdpa[{B}x{dense_L}]", B * 4.0 * dense_L * dense_L * C,
                         time_dense(B, dense_L, H, d, dtype, args)))
        print(_fmt(rows[-1]))
    return rows


def _add_custom_variant(args) -> None:
    """Registers ``--window-buckets`` / ``--window-heads`` as the Triton variant "custom" and adds it to
    ``--triton-variants`` when that names variants."""
    try:
        from trellis.modules.attention import triton_varlen as tv
    except ImportError as e:
        raise SystemExit(f"--window-buckets needs the Triton kernels: {e}") from e

    form = "BLOCK:FWD_M:FWD_WARPS:BWD_M:BWD_WARPS[:STAGES[:FWD_SPLIT]], all integers"
    rows = []
    for spec in args.window_buckets:
        try:
            rows.append(tuple(int(f) for f in spec.split(":")))
        except ValueError as e:
            raise SystemExit(f"--window-buckets {spec!r}: expected {form}") from e
        if not 5 <= len(rows[-1]) <= 7:
            raise SystemExit(f"--window-buckets {spec!r}: expected {form}")
    try:
        buckets = tv.check_buckets(rows)
    except ValueError as e:
        raise SystemExit(f"--window-buckets: {e}") from e
    heads = args.window_heads if args.window_heads == "auto" else int(args.window_heads)
    tv.VARIANTS["custom"] = tv._variant(buckets=buckets, heads=heads)
    if args.triton_variants is not None and "custom" not in args.triton_variants:
        args.triton_variants.append("custom")


def _default_variant() -> str:
    from trellis.modules.attention import triton_varlen as tv

    return tv.DEFAULT_VARIANT


def _fmt(r: dict) -> str:
    return (f"  {r['backend']:<22} fwd {r['fwd_ms']:8.3f} ms {r['fwd_tflops']:7.1f} TF/s | fwd+bwd "
            f"{r['fwd_bwd_ms']:8.3f} ms {r['fwd_bwd_tflops']:7.1f} TF/s {r['note']}")


# ----------------------------------------------------------------------------- cases
def case_swin8_shells(args) -> list[dict]:
    """swin-8 (shift 4) over 8 single-shell objects at 64^3, C 768, 12 heads; dense at equal tokens."""
    coords = objects(8, 1, res=16 if SMOKE else 64, seed=1)
    return run_varlen_case("swin8_shells_C768", coords, lambda x: window_plan(x, (8, 8, 8), (4, 4, 4)),
                           768, 12, args, dense_L=coords.shape[0] // 8)


def case_swin8_objects(args) -> list[dict]:
    """swin-8 (shift 0) over 4 standard objects (3 shells each, ~16k voxels), C 768, 12 heads."""
    coords = objects(4, 3, res=16 if SMOKE else 64, seed=2)
    return run_varlen_case("swin8_objects_C768", coords, lambda x: window_plan(x, (8, 8, 8), (0, 0, 0)),
                           768, 12, args, dense_L=None)


def standard_objects(batch: int, res: int, seed: int = 0) -> torch.Tensor:
    """``[N, 4]`` int32 coords of the sparse-conv benchmark's objects (``bench_sparse.shells``: its
    generator, on the device, so the same voxels as that benchmark on a GPU)."""
    from bench_sparse import shell_object

    dev = torch.device(DEVICE)
    gen = torch.Generator(device=dev).manual_seed(seed)
    rows = []
    for b in range(batch):
        xyz = shell_object(res, gen, dev)
        rows.append(torch.cat([torch.full_like(xyz[:, :1], b), xyz], 1))
    return torch.cat(rows).int().cpu()


def case_swin8_8objects(args) -> list[dict]:
    """swin-8 (shift 4) over the 8 standard objects (3 shells each) of the conv benchmark, C 768, 12 heads."""
    coords = standard_objects(8, 16 if SMOKE else 64)
    return run_varlen_case("swin8_8objects_C768", coords, lambda x: window_plan(x, (8, 8, 8), (4, 4, 4)),
                           768, 12, args, dense_L=coords.shape[0] // 8)


def case_full_objects(args) -> list[dict]:
    """Full attention over 8 sequences of 2k-8k tokens, C 1024, 16 heads; dense SDPA at equal tokens."""
    gen = torch.Generator().manual_seed(3)
    lens = torch.randint(20, 61, (8,), generator=gen) if SMOKE else torch.randint(2048, 8193, (8,), generator=gen)
    coords = torch.cat([torch.cat([torch.full((int(n), 1), b), torch.zeros(int(n), 3, dtype=torch.long)], 1)
                        for b, n in enumerate(lens)]).int()
    return run_varlen_case("full_2k-8k_C1024", coords, full_plan, 1024, 16, args,
                           dense_L=int(lens.sum()) // 8)


def case_cross(args) -> list[dict]:
    """Cross-attention of 8 x 4k voxels to 1374 image tokens, C 1024, 16 heads."""
    dtype, C, H, B, Lq, Lc = torch.bfloat16, 1024, 16, 8, 4096, 1374
    if SMOKE:
        Lq, Lc = 32, 11
    d = C // H
    cu_q = (torch.arange(B + 1) * Lq).int().to(DEVICE)
    cu_kv = (torch.arange(B + 1) * Lc).int().to(DEVICE)
    plan = VarlenPlan(cu_q, cu_kv)
    q = torch.randn(B * Lq, H, d, device=DEVICE, dtype=dtype, requires_grad=True)
    kv = torch.randn(B * Lc, 2, H, d, device=DEVICE, dtype=dtype, requires_grad=True)
    k, v = kv.unbind(1)
    flops = B * 4.0 * Lq * Lc * C
    print(f"[cross_4k_x_1374] fwd GFLOP={flops / 1e9:.2f}")
    rows = []
    for backend in _backends(dtype, args):  # Triton: default variant (no window-sized sequences), each config
        for cfg in _triton_configs(args) if backend == "triton" else [None]:
            note = _set_triton(_default_variant(), cfg) if backend == "triton" else ""
            try:
                timing = time_varlen(q, k, v, [q, kv], plan, backend, args)
            except (RuntimeError, ValueError) as e:
                print(f"  {backend} {note} failed: {type(e).__name__}: {str(e)[:300]}")
                continue
            finally:
                if backend == "triton":
                    _set_triton(_default_variant(), None)
            rows.append(_row("cross_4k_x_1374", backend, flops, timing, note))
            print(_fmt(rows[-1]))
    rows.append(_row("cross_4k_x_1374", "dense_sdpa", flops, time_dense(B, Lq, H, d, dtype, args, Lkv=Lc)))
    print(_fmt(rows[-1]))
    return rows


CASES: list[tuple[str, Callable]] = [
    ("swin8_shells", case_swin8_shells),
    ("swin8_objects", case_swin8_objects),
    ("swin8_8objects", case_swin8_8objects),
    ("full_objects", case_full_objects),
    ("cross", case_cross),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="*", default=[n for n, _ in CASES])
    ap.add_argument("--backends", nargs="*", default=list(VARLEN_BACKENDS))
    ap.add_argument("--triton-variants", nargs="*", default=None,
                    help="named Triton configurations (triton_varlen.VARIANTS; default: all of them, each a "
                         "row 'triton[NAME]'; 'old' = the window path off)")
    ap.add_argument("--triton-configs", nargs="*", default=None,
                    help="long-path blocks BM,BN,warps for fwd, bwd_kv, bwd_q [, bwd_fused] (9 or 12 ints each), "
                         "applied on top of each variant (default: the variant's own)")
    ap.add_argument("--window-buckets", nargs="*", default=None, metavar="BLOCK:FWD_M:FWD_WARPS:BWD_M:BWD_WARPS[:STAGES[:FWD_SPLIT]]",
                    help="also time a Triton variant 'custom' with these window buckets (triton_varlen.WindowBucket "
                         "fields, e.g. 32:32:4:32:4 64:64:4:64:4 128:64:4:64:4)")
    ap.add_argument("--window-heads", default="auto",
                    help="heads per window program of the 'custom' variant: 'auto', 0 (all) or a number")
    ap.add_argument("--window-order", action="store_true",
                    help="swin cases: also time every row with the rows already in window order (no row index; "
                         "rows '...@ordered') and print the rate of copying the rows through the index")
    ap.add_argument("--check", action="store_true",
                    help="note each row's relative error (output, qkv gradient) against the float32 torch backend")
    ap.add_argument("--kernel-time", action="store_true",
                    help="also note each row's GPU kernel time (summed kernel durations from the profiler, no host "
                         "launch time) and the rates over it")
    ap.add_argument("--kernel-breakdown", action="store_true",
                    help="print each row's GPU kernels with their durations (one profiled forward + backward)")
    ap.add_argument("--roofline", action="store_true",
                    help="self-attention cases: print the least time the memory traffic allows at the measured "
                         "contiguous copy rate, and the TFLOP/s that caps")
    ap.add_argument("--no-packed", dest="packed", action="store_false",
                    help="leave out the rows 'triton[NAME,packed]' (packed_attention_with_plan, the layers' entry "
                         "point): one per variant named with --triton-variants, else the default's")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", type=str, default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run that only checks the script works")
    args = ap.parse_args()
    args.bandwidth = None
    global DEVICE, SMOKE
    if args.smoke:
        DEVICE, SMOKE = "cpu", True
        args.warmup, args.reps, args.backends = 0, 1, ["torch", "torch_seq"]
    elif not torch.cuda.is_available():
        raise SystemExit("bench_attention.py needs a CUDA device (or --smoke)")
    if args.window_buckets is not None:
        _add_custom_variant(args)
    peak = bf16_peak_tflops(DEVICE, reps=10) if not SMOKE else float("nan")
    device_name = torch.cuda.get_device_name() if not SMOKE else "cpu"
    print(f"device {device_name} torch {torch.__version__}; bf16 8192^3 matmul {peak:.0f} TFLOP/s")
    rows = []
    for name, fn in CASES:
        if name in args.cases:
            rows += fn(args)
    print("\ncase                   backend                 fwd ms  fwd TF/s  fwd+bwd ms  fwd+bwd TF/s  note")
    for r in rows:
        print(f"{r['case']:<22} {r['backend']:<22} {r['fwd_ms']:7.3f} {r['fwd_tflops']:8.1f} {r['fwd_bwd_ms']:10.3f} "
              f"{r['fwd_bwd_tflops']:12.1f}  {r['note']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device_name, "peak_tflops": peak,
                                               "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
