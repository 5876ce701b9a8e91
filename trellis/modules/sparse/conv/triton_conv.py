"""Triton implicit-GEMM sparse convolution (CUDA; ``SPARSE_BACKEND=triton`` or ``auto`` on GPU).

Forward (and the input gradient, which is the same op on the transposed map with ``W[k].T``) is
output-stationary: a program owns ``BM`` output rows x ``BN`` output channels and accumulates
``sum_k feats[nbr[o, k]] @ W[k]`` in float32, gathering input rows on the fly (nothing is
materialised). Rows are processed in the order of their neighbour bitmask (``argsort`` of the
packed mask, as spconv's sorted-mask implicit GEMM does), so that the rows of one block share most
of their active offsets; each block then visits only the offsets active for at least one of its
rows (a compacted per-block offset list).

The weight gradient ``dW[k] = feats[in_k].T @ grad_out[out_k]`` runs over the exact active pairs,
split into chunks of ``PAIR_CHUNK`` pairs per program and accumulated with float32 atomics.

Importing this module imports Triton; callers import it lazily (``conv.py``) and only for CUDA
tensors. The pure-PyTorch backend is the reference it is tested against (``tests/test_sparse_conv_gpu.py``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from trellis.modules.sparse.conv.kernel_map import KernelMap

__all__ = ["conv_triton", "BLOCK_M", "PAIR_CHUNK"]

BLOCK_M = 32 if os.environ.get("TRITON_INTERPRET", "0") == "1" else 128
PAIR_CHUNK = 4096


def _fwd_configs():
    return [
        triton.Config({"BN": bn, "BK": bk}, num_warps=w, num_stages=s)
        for bn, bk, w, s in [(128, 64, 8, 3), (128, 32, 4, 4), (64, 64, 4, 3), (128, 64, 4, 4),
                             (256, 64, 8, 3), (64, 32, 4, 4), (64, 128, 4, 3), (128, 128, 8, 2),
                             (256, 32, 8, 4), (128, 64, 8, 4)]
    ]


@triton.jit
def _implicit_gemm_kernel(
    feats_ptr, w_ptr, nbr_ptr, perm_ptr, koff_ptr, kcnt_ptr, out_ptr,
    N, K,
    C_in: tl.constexpr, C_out: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    row_ok = rm < N
    rows = tl.load(perm_ptr + rm, mask=row_ok, other=0).to(tl.int64)  # original output rows
    rn = pid_n * BN + tl.arange(0, BN)
    n_ok = rn < C_out
    rk = tl.arange(0, BK)
    NC: tl.constexpr = (C_in + BK - 1) // BK
    kcount = tl.load(kcnt_ptr + pid_m)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for t in range(0, kcount * NC):
        k = tl.load(koff_ptr + pid_m * K + t // NC)
        c0 = (t % NC) * BK
        idx = tl.load(nbr_ptr + rows * K + k, mask=row_ok, other=-1)
        ok = idx >= 0
        rc = c0 + rk
        c_ok = rc < C_in
        a = tl.load(feats_ptr + idx.to(tl.int64)[:, None] * C_in + rc[None, :],
                    mask=ok[:, None] & c_ok[None, :], other=0.0)
        b = tl.load(w_ptr + (k.to(tl.int64) * C_in + rc[:, None]) * C_out + rn[None, :],
                    mask=c_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    tl.store(out_ptr + rows[:, None] * C_out + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :])


def _wgrad_configs():
    return [
        triton.Config({"BMW": bm, "BNW": bn, "BKW": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [(64, 64, 64, 4, 3), (128, 128, 32, 8, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3),
                                 (128, 128, 64, 8, 3), (64, 64, 128, 4, 3), (128, 256, 32, 8, 3)]
    ]


@triton.jit
def _wgrad_kernel(
    feats_ptr, grad_ptr, in_ptr, out_ptr, chunk_k_ptr, chunk_s_ptr, chunk_e_ptr, dw_ptr,
    C_in: tl.constexpr, C_out: tl.constexpr,
    BMW: tl.constexpr, BNW: tl.constexpr, BKW: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    k = tl.load(chunk_k_ptr + pid_c).to(tl.int64)
    start = tl.load(chunk_s_ptr + pid_c)
    end = tl.load(chunk_e_ptr + pid_c)
    rm = pid_m * BMW + tl.arange(0, BMW)
    m_ok = rm < C_in
    rn = pid_n * BNW + tl.arange(0, BNW)
    n_ok = rn < C_out
    acc = tl.zeros((BMW, BNW), dtype=tl.float32)
    for p0 in range(start, end, BKW):
        rp = p0 + tl.arange(0, BKW)
        ok = rp < end
        i = tl.load(in_ptr + rp, mask=ok, other=0).to(tl.int64)
        o = tl.load(out_ptr + rp, mask=ok, other=0).to(tl.int64)
        a = tl.load(feats_ptr + i[None, :] * C_in + rm[:, None], mask=ok[None, :] & m_ok[:, None], other=0.0)
        b = tl.load(grad_ptr + o[:, None] * C_out + rn[None, :], mask=ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    tl.atomic_add(dw_ptr + (k * C_in + rm[:, None]) * C_out + rn[None, :], acc,
                  mask=m_ok[:, None] & n_ok[None, :])


# Autotuning needs a GPU driver; under TRITON_INTERPRET=1 (CPU debugging) or with
# TRELLIS_TRITON_AUTOTUNE=0 (fast compiles, e.g. in tests) one fixed config is used. Read per call.
_FIXED_FWD = {"BN": 64, "BK": 32, "num_warps": 4, "num_stages": 3}
_FIXED_WG = {"BMW": 64, "BNW": 64, "BKW": 32, "num_warps": 4, "num_stages": 3}
_TUNED: dict = {}


def _kernels() -> tuple:
    """``(fwd_kernel, fwd_meta, wgrad_kernel, wgrad_meta)`` per the current settings."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return (_implicit_gemm_kernel, {"BN": 32, "BK": 16}, _wgrad_kernel, {"BMW": 32, "BNW": 32, "BKW": 16})
    if os.environ.get("TRELLIS_TRITON_AUTOTUNE", "1") == "0":
        return _implicit_gemm_kernel, _FIXED_FWD, _wgrad_kernel, _FIXED_WG
    if not _TUNED:
        _TUNED["fwd"] = triton.autotune(configs=_fwd_configs(), key=["C_in", "C_out", "BM"])(_implicit_gemm_kernel)
        _TUNED["wg"] = triton.autotune(configs=_wgrad_configs(), key=["C_in", "C_out"],
                                       reset_to_zero=["dw_ptr"])(_wgrad_kernel)
    return _TUNED["fwd"], {}, _TUNED["wg"], {}


def _schedule(kmap: KernelMap, bm: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row order and per-block active offsets: ``perm [N]``, ``koff [nblocks, K]``, ``kcnt [nblocks]``
    (int32). Cached on the map."""
    key = f"triton_schedule:{bm}"
    hit = kmap._extra.get(key)
    if hit is not None:
        return hit
    nbr = kmap.nbr
    N, K = nbr.shape
    dev = nbr.device
    active = nbr >= 0  # [N, K]
    if K <= 62:
        bits = torch.bitwise_left_shift(torch.ones(K, dtype=torch.int64, device=dev), torch.arange(K, device=dev))
        mask = (active.long() * bits).sum(1)  # [N] packed neighbour mask
        perm = torch.argsort(mask, stable=True)
    else:
        perm = torch.arange(N, device=dev)
    nblocks = triton.cdiv(N, bm)
    pad = nblocks * bm - N
    act_sorted = active[perm]
    if pad:
        act_sorted = torch.cat([act_sorted, act_sorted.new_zeros(pad, K)])
    block_active = act_sorted.reshape(nblocks, bm, K).any(1)  # [nblocks, BM, K] -> [nblocks, K]
    kcnt = block_active.sum(1).int()
    # active offsets first (ascending k), inactive after: sort by (not active, k)
    order = torch.argsort((~block_active).int() * K + torch.arange(K, device=dev), dim=1)
    result = (perm.int().contiguous(), order.int().contiguous(), kcnt.contiguous())
    kmap._extra[key] = result
    return result


def _chunks(kmap: KernelMap) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pair chunks for the weight gradient: ``(k, start, end)`` int32 each ``[n_chunks]``. Cached."""
    hit = kmap._extra.get("triton_chunks")
    if hit is not None:
        return hit
    _, _, bounds = kmap.pairs()
    ks, ss, es = [], [], []
    for k in range(kmap.volume):
        for s in range(bounds[k], bounds[k + 1], PAIR_CHUNK):
            ks.append(k)
            ss.append(s)
            es.append(min(s + PAIR_CHUNK, bounds[k + 1]))
    dev = kmap.nbr.device
    result = tuple(torch.tensor(v, dtype=torch.int32, device=dev) for v in (ks, ss, es))
    kmap._extra["triton_chunks"] = result
    return result


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _implicit_gemm(feats: torch.Tensor, weight: torch.Tensor, kmap: KernelMap) -> torch.Tensor:
    """``[N_in, C_in]`` x ``[K, C_in, C_out]`` over ``kmap`` -> ``[N_out, C_out]``."""
    feats = feats.contiguous()
    weight = weight.contiguous()
    K, C_in, C_out = weight.shape
    N = kmap.n_out
    out = torch.empty(N, C_out, dtype=feats.dtype, device=feats.device)
    if N == 0:
        return out
    perm, koff, kcnt = _schedule(kmap, BLOCK_M)
    nbr = kmap.nbr.contiguous()

    def grid(meta):
        return (triton.cdiv(N, BLOCK_M), triton.cdiv(C_out, meta["BN"]))

    fwd_kernel, fwd_meta, _, _ = _kernels()
    fwd_kernel[grid](feats, weight, nbr, perm, koff, kcnt, out, N, K, C_in=C_in, C_out=C_out,
                      BM=BLOCK_M, PRECISION=_precision(feats.dtype), **fwd_meta)
    return out


def _weight_grad(feats: torch.Tensor, grad_out: torch.Tensor, kmap: KernelMap, K: int) -> torch.Tensor:
    C_in, C_out = feats.shape[1], grad_out.shape[1]
    dw = torch.zeros(K, C_in, C_out, dtype=torch.float32, device=feats.device)
    in_idx, out_idx, _ = kmap.pairs()
    ck, cs, ce = _chunks(kmap)
    if ck.numel() == 0:
        return dw

    def grid(meta):
        return (ck.numel(), triton.cdiv(C_in, meta["BMW"]), triton.cdiv(C_out, meta["BNW"]))

    _, _, wg_kernel, wg_meta = _kernels()
    wg_kernel[grid](feats.contiguous(), grad_out.contiguous(), in_idx, out_idx, ck, cs, ce, dw,
                     C_in=C_in, C_out=C_out, PRECISION=_precision(feats.dtype), **wg_meta)
    return dw


class _TritonSparseConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feats: torch.Tensor, weight: torch.Tensor, kmap: KernelMap) -> torch.Tensor:
        ctx.save_for_backward(feats, weight)
        ctx.kmap = kmap
        return _implicit_gemm(feats, weight, kmap)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        feats, weight = ctx.saved_tensors
        kmap: KernelMap = ctx.kmap
        grad_out = grad_out.to(feats.dtype).contiguous()
        grad_feats = grad_weight = None
        if ctx.needs_input_grad[0]:
            w_t = weight.transpose(1, 2)  # [K, C_out, C_in]
            grad_feats = _implicit_gemm(grad_out, w_t, kmap.transposed())
        if ctx.needs_input_grad[1]:
            grad_weight = _weight_grad(feats, grad_out, kmap, weight.shape[0]).to(weight.dtype)
        return grad_feats, grad_weight, None


def conv_triton(feats: torch.Tensor, weight: torch.Tensor, kmap: KernelMap) -> torch.Tensor:
    """``[N_in, C_in]`` feats, ``[K, C_in, C_out]`` weight -> ``[N_out, C_out]`` (no bias)."""
    if feats.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"conv_triton: unsupported dtype {feats.dtype} (float16, bfloat16, float32)")
    return _TritonSparseConv.apply(feats, weight, kmap)
