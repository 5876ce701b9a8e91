"""Sparse-core micro-benchmarks (GPU): forward and forward+backward time and effective TFLOP/s.

Conventions: /work/shared/BENCHMARKING.md (CUDA events after warm-up, median of repetitions, card
name and measured bf16 matmul peak printed first; workloads are unions of 3 random superellipsoid
surface shells per object). Sparse-conv FLOPs count only active neighbour pairs:
``2 x pairs x C_in x C_out`` forward, 3x that for forward+backward.

Cases are a list of named ``Case`` objects; add more (e.g. attention) by appending to ``CASES``.
Each case's ``variants(dtype)`` yields ``(label, fwd_fn, fwd_bwd_fn)`` for every backend that runs.

    python scripts/bench_sparse.py [--dtype fp16|bf16|fp32] [--reps 20] [--cases NAME,...]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import bf16_peak_tflops, cuda_time_ms  # noqa: E402

from trellis.backends import has_module, use_backend  # noqa: E402
from trellis.modules.sparse import SparseTensor  # noqa: E402
from trellis.modules.sparse.conv import SparseConv3d, submanifold_map  # noqa: E402

Fn = Callable[[], object]


# ---------------------------------------------------------------------- workloads
def shell_object(res: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """``[M, 3]`` int coords: the union of 3 random superellipsoid surface shells on ``res^3``."""
    ar = torch.arange(res, device=device, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(ar, ar, ar, indexing="ij"), -1)  # [R, R, R, 3]
    union = torch.zeros(res, res, res, dtype=torch.bool, device=device)
    for _ in range(3):
        centre = res * (0.4 + 0.2 * torch.rand(3, generator=gen, device=device))
        radii = res * (0.25 + 0.15 * torch.rand(3, generator=gen, device=device))
        p = 2.0 + 2.0 * torch.rand(1, generator=gen, device=device)
        inside = (((grid - centre) / radii).abs() ** p).sum(-1) <= 1.0
        padded = F.pad(inside, (1, 1, 1, 1, 1, 1))  # outside the grid counts as empty
        six = torch.ones_like(inside)  # all 6 face neighbours inside
        for axis in range(3):
            for shift in (-1, 1):
                six &= torch.roll(padded, shift, axis)[1:-1, 1:-1, 1:-1]
        union |= inside & ~six  # inside with at least one empty 6-neighbour
    return torch.nonzero(union)


def shells(batch: int, res: int, channels: int, dtype: torch.dtype, seed: int = 0) -> SparseTensor:
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(seed)
    coords = []
    for b in range(batch):
        xyz = shell_object(res, gen, dev)
        coords.append(torch.cat([torch.full_like(xyz[:, :1], b), xyz], 1))
    coords = torch.cat(coords).int()
    feats = torch.randn(coords.shape[0], channels, device=dev, dtype=dtype)
    return SparseTensor(feats, coords, shape=[batch, channels])


# ---------------------------------------------------------------------- cases
@dataclass
class Case:
    name: str
    describe: Callable[[], str]
    flops_fwd: Callable[[], float]
    variants: Callable[[torch.dtype], Iterator[tuple[str, Fn, Fn]]]


def spconv_native_variants(x: SparseTensor, c_in: int, c_out: int, res: int, batch: int, dtype: torch.dtype,
                           grad: torch.Tensor) -> Iterator[tuple[str, Fn, Fn]]:
    """spconv's own module path (``spconv.pytorch.SubMConv3d`` on a ``SparseConvTensor``, index pairs
    built once and found again through ``indice_key``), for each of its GEMM algorithms: the way
    spconv's users and its own benchmarks call it, with none of our wrapper in the way."""
    import spconv.pytorch as spconv

    base = spconv.SparseConvTensor(x.feats, x.coords, [res] * 3, batch)
    for algo in ("MaskImplicitGemm", "MaskSplitImplicitGemm", "Native"):
        key = f"bench_{algo}"
        conv = spconv.SubMConv3d(c_in, c_out, 3, bias=True, indice_key=key,
                                 algo=getattr(spconv.ConvAlgo, algo)).cuda().to(dtype)
        try:
            with torch.no_grad():
                cached = conv(base)  # builds the index pairs once; later calls find them under `key`
        except (RuntimeError, ValueError, AssertionError, NotImplementedError) as e:
            print(f"  spconv native {algo}: not run ({type(e).__name__}: {str(e)[:120]})")
            continue

        def fwd(conv=conv, cached=cached):
            with torch.no_grad():
                return conv(cached.replace_feature(x.feats))

        def fwd_bwd(conv=conv, cached=cached):
            y = conv(cached.replace_feature(x.feats.detach().requires_grad_(True)))
            y.features.backward(grad)
        yield f"spconv native {algo}", fwd, fwd_bwd


def conv_case(name: str, batch: int, res: int, c_in: int, c_out: int) -> Case:
    state: dict = {}

    def setup(dtype):
        if state.get("dtype") != dtype:
            state.clear()
            state["dtype"] = dtype
            state["x"] = shells(batch, res, c_in, dtype)
            state["pairs"] = submanifold_map(state["x"], (3, 3, 3), (1, 1, 1)).num_pairs
            x = state["x"]
            state["map_ms"] = cuda_time_ms(  # a fresh coordinate set (empty cache) each time
                lambda: submanifold_map(x.replace(x.feats, x.coords.clone()), (3, 3, 3), (1, 1, 1)).pairs(), 5)
        return state["x"]

    def describe():
        x = state["x"]
        return (f"{batch} x {res}^3 shells, {x.coords.shape[0]} voxels, {state['pairs']} pairs "
                f"({state['pairs'] / x.coords.shape[0]:.1f}/voxel), C {c_in}->{c_out}; "
                f"kernel map build {state['map_ms']:.2f} ms (once per coordinate set, cached); {state.get('check', '')}")

    def flops_fwd():
        return 2.0 * state["pairs"] * c_in * c_out

    def variants(dtype):
        x = setup(dtype)
        conv = SparseConv3d(c_in, c_out, 3).cuda().to(dtype)
        grad = torch.randn(x.coords.shape[0], c_out, device="cuda", dtype=dtype)
        backends = ["triton", "torch"] + (["spconv"] if has_module("spconv") else [])
        with torch.no_grad():  # sanity: the benchmarked fast path agrees with the reference
            outs = {}
            for backend in ("triton", "torch"):
                with use_backend("sparse_conv", backend):
                    outs[backend] = conv(x).feats.float()
            err = (outs["triton"] - outs["torch"]).abs().max() / outs["torch"].abs().max()
            state["check"] = f"triton vs torch max rel err {err.item():.1e}"
        for backend in backends:
            def fwd(backend=backend):
                with torch.no_grad(), use_backend("sparse_conv", backend):
                    return conv(x)

            def fwd_bwd(backend=backend):
                xf = x.replace(x.feats.detach().requires_grad_(True))
                with use_backend("sparse_conv", backend):
                    y = conv(xf)
                y.feats.backward(grad)
            yield backend, fwd, fwd_bwd
        if has_module("spconv"):
            yield from spconv_native_variants(x, c_in, c_out, res, batch, dtype, grad)
        dense_bytes = batch * res**3 * max(c_in, c_out) * torch.finfo(dtype).bits // 8
        if dense_bytes * 6 < torch.cuda.mem_get_info()[0]:
            xd = x.dense([res] * 3).contiguous(memory_format=torch.channels_last_3d)
            w = torch.randn(c_out, c_in, 3, 3, 3, device="cuda", dtype=dtype).contiguous(
                memory_format=torch.channels_last_3d)
            gd = torch.randn(batch, c_out, res, res, res, device="cuda", dtype=dtype).contiguous(
                memory_format=torch.channels_last_3d)

            def dense_fwd():
                with torch.no_grad():
                    return F.conv3d(xd, w, padding=1)

            def dense_fwd_bwd():
                xr = xd.detach().requires_grad_(True)
                wr = w.detach().requires_grad_(True)
                F.conv3d(xr, wr, padding=1).backward(gd)
            yield "dense conv3d", dense_fwd, dense_fwd_bwd

    return Case(name, describe, flops_fwd, variants)


CASES: list[Case] = [
    conv_case("subm3_64_c128", 8, 64, 128, 128),
    conv_case("subm3_32_c1024", 8, 32, 1024, 1024),
    conv_case("subm3_128_c192", 4, 128, 192, 192),
    conv_case("subm3_64_c768_192", 8, 64, 768, 192),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_sparse.py needs a CUDA device")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    wanted = set(filter(None, args.cases.split(",")))
    unknown = wanted - {c.name for c in CASES}
    if unknown:
        raise SystemExit(f"unknown cases {sorted(unknown)}; known: {[c.name for c in CASES]}")
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  dtype {args.dtype}")
    print(f"measured bf16 matmul peak (8192^3): {bf16_peak_tflops():.0f} TFLOP/s")
    for case in CASES:
        if wanted and case.name not in wanted:
            continue
        rows = []
        for label, fwd, fwd_bwd in case.variants(dtype):
            try:
                t_f = cuda_time_ms(fwd, args.reps)
                t_fb = cuda_time_ms(fwd_bwd, args.reps)
            except torch.OutOfMemoryError:
                rows.append(f"  {label:<14} out of memory")
                torch.cuda.empty_cache()
                continue
            fl = case.flops_fwd()
            rows.append(f"  {label:<14} fwd {t_f:8.3f} ms ({fl / t_f / 1e9:6.1f} TFLOP/s)   "
                        f"fwd+bwd {t_fb:8.3f} ms ({3 * fl / t_fb / 1e9:6.1f} TFLOP/s)")
        print(f"[{case.name}] {case.describe()}")
        print("\n".join(rows), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
