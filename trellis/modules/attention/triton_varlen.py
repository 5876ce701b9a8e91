"""Triton flash-attention for gathered variable-length sequences (backend ``triton``; CUDA only).

What it computes is ``attention_with_plan`` (``trellis.modules.attention.varlen``): sequence i attends
from the query rows ``index_q[cu_q[i]:cu_q[i+1]]`` to the key/value rows ``index_kv[cu_kv[i]:cu_kv[i+1]]``
(identity without an index). The kernels read those rows in place and write outputs and gradients
back to them, so windowed attention needs no permuted copy of q, k, v, out or their gradients, and no
padding: one program handles one block of up to ``BLOCK_M`` queries of one sequence and one head and
loops over that sequence's keys in blocks of ``BLOCK_N``, with the online softmax of FlashAttention
(Dao et al. 2022, arXiv:2205.14135). Short windows (the swin-8 windows of a surface hold ~50-150
voxels) take one or two iterations. The backward pass follows FlashAttention-2 (Dao 2023,
arXiv:2307.08691): one kernel per key block accumulates dK and dV over the query blocks, one per
query block accumulates dQ; every output row has one owner, so there are no atomics. Sequences that
fit one tile (at most ``BLOCK_CONFIG["bwd_fused"][0]`` queries and keys, most surface windows) take a
fused backward instead: one program loads q, k, v, O and dO once and writes dQ, dK and dV.

Importing this module imports Triton; ``varlen.py`` imports it only when the backend is selected.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from trellis.modules.attention.varlen import VarlenPlan

__all__ = ["triton_varlen_attention", "BLOCK_CONFIG"]

# (BLOCK_M, BLOCK_N, num_warps) for the forward and the two backward kernels; the benchmark may set it.
# "bwd_fused": (BLOCK, BLOCK, num_warps): sequences with at most BLOCK queries and keys take the one-program
# backward; BLOCK 0 disables it.
BLOCK_CONFIG = {"fwd": (64, 64, 4), "bwd_kv": (64, 64, 4), "bwd_q": (64, 64, 4), "bwd_fused": (64, 64, 4)}

_LOG2E = 1.4426950408889634


@triton.jit
def _rows(IDX, pos, mask, GATHER: tl.constexpr):
    if GATHER:
        r = tl.load(IDX + pos, mask=mask, other=0)
    else:
        r = pos
    return r.to(tl.int64)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _fwd_kernel(
    Q, K, V, OUT, LSE, IDXQ, IDXK, CUQ, CUK, BLK_SEQ, BLK_START,
    sq_r, sq_h, sk_r, sk_h, sv_r, sv_h, so_r, so_h,
    n_heads, qk_scale, D,
    GATHER_Q: tl.constexpr, GATHER_K: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    seq = tl.load(BLK_SEQ + pid)
    m0 = tl.load(BLK_START + pid)
    q_lo = tl.load(CUQ + seq)
    n_q = tl.load(CUQ + seq + 1) - q_lo
    k_lo = tl.load(CUK + seq)
    n_kv = tl.load(CUK + seq + 1) - k_lo
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n_q
    rows_q = _rows(IDXQ, q_lo + offs_m, mask_m, GATHER_Q)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    q = tl.load(Q + rows_q[:, None] * sq_r + h * sq_h + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, n_kv, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_kv
        rows_k = _rows(IDXK, k_lo + offs_n, mask_n, GATHER_K)
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(K + rows_k[:, None] * sk_r + h * sk_h + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + rows_k[:, None] * sv_r + h * sv_h + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), IEEE) * qk_scale  # [BM, BN], log2 units
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(OUT + rows_q[:, None] * so_r + h * so_h + offs_d[None, :], acc.to(OUT.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])
    tl.store(LSE + rows_q * n_heads + h, m_i + tl.log2(l_i), mask=mask_m)


@triton.jit
def _bwd_kv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, IDXQ, IDXK, CUQ, CUK, BLK_SEQ, BLK_START,
    sq_r, sq_h, sk_r, sk_h, sv_r, sv_h, sdo_r, sdo_h, sdk_r, sdk_h, sdv_r, sdv_h,
    n_heads, qk_scale, sm_scale, D,
    GATHER_Q: tl.constexpr, GATHER_K: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    seq = tl.load(BLK_SEQ + pid)
    n0 = tl.load(BLK_START + pid)
    q_lo = tl.load(CUQ + seq)
    n_q = tl.load(CUQ + seq + 1) - q_lo
    k_lo = tl.load(CUK + seq)
    n_kv = tl.load(CUK + seq + 1) - k_lo
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_kv
    rows_k = _rows(IDXK, k_lo + offs_n, mask_n, GATHER_K)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    kv_mask = mask_n[:, None] & mask_d[None, :]
    k = tl.load(K + rows_k[:, None] * sk_r + h * sk_h + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + rows_k[:, None] * sv_r + h * sv_h + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for m0 in range(0, n_q, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < n_q
        rows_q = _rows(IDXQ, q_lo + offs_m, mask_m, GATHER_Q)
        q_mask = mask_m[:, None] & mask_d[None, :]
        q = tl.load(Q + rows_q[:, None] * sq_r + h * sq_h + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(DO + rows_q[:, None] * sdo_r + h * sdo_h + offs_d[None, :], mask=q_mask, other=0.0)
        lse = tl.load(LSE + rows_q * n_heads + h, mask=mask_m, other=0.0)
        delta = tl.load(DELTA + rows_q * n_heads + h, mask=mask_m, other=0.0)
        s = _dot(q, tl.trans(k), IEEE) * qk_scale  # [BM, BN]
        p = tl.exp2(s - lse[:, None])
        p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
        dv += _dot(tl.trans(p.to(do.dtype)), do, IEEE)
        dp = _dot(do, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None])
        dk += _dot(tl.trans(ds.to(q.dtype)), q, IEEE)
    dk = dk * sm_scale
    tl.store(DK + rows_k[:, None] * sdk_r + h * sdk_h + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + rows_k[:, None] * sdv_r + h * sdv_h + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_q_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, IDXQ, IDXK, CUQ, CUK, BLK_SEQ, BLK_START,
    sq_r, sq_h, sk_r, sk_h, sv_r, sv_h, sdo_r, sdo_h, sdq_r, sdq_h,
    n_heads, qk_scale, sm_scale, D,
    GATHER_Q: tl.constexpr, GATHER_K: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    seq = tl.load(BLK_SEQ + pid)
    m0 = tl.load(BLK_START + pid)
    q_lo = tl.load(CUQ + seq)
    n_q = tl.load(CUQ + seq + 1) - q_lo
    k_lo = tl.load(CUK + seq)
    n_kv = tl.load(CUK + seq + 1) - k_lo
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n_q
    rows_q = _rows(IDXQ, q_lo + offs_m, mask_m, GATHER_Q)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    q_mask = mask_m[:, None] & mask_d[None, :]
    q = tl.load(Q + rows_q[:, None] * sq_r + h * sq_h + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + rows_q[:, None] * sdo_r + h * sdo_h + offs_d[None, :], mask=q_mask, other=0.0)
    lse = tl.load(LSE + rows_q * n_heads + h, mask=mask_m, other=0.0)
    delta = tl.load(DELTA + rows_q * n_heads + h, mask=mask_m, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, n_kv, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_kv
        rows_k = _rows(IDXK, k_lo + offs_n, mask_n, GATHER_K)
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(K + rows_k[:, None] * sk_r + h * sk_h + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + rows_k[:, None] * sv_r + h * sv_h + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), IEEE) * qk_scale
        p = tl.exp2(s - lse[:, None])
        p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
        dp = _dot(do, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, IEEE)
    dq = dq * sm_scale
    tl.store(DQ + rows_q[:, None] * sdq_r + h * sdq_h + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _bwd_fused_kernel(
    Q, K, V, OUT, DO, LSE, DQ, DK, DV, IDXQ, IDXK, CUQ, CUK, SEQS,
    sq_r, sq_h, sk_r, sk_h, sv_r, sv_h, so_r, so_h, sdo_r, sdo_h, sdq_r, sdq_h, sdk_r, sdk_h, sdv_r, sdv_h,
    n_heads, qk_scale, sm_scale, D,
    GATHER_Q: tl.constexpr, GATHER_K: tl.constexpr, IEEE: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Whole backward of one short sequence (<= BLOCK queries and keys) and one head in one program."""
    seq = tl.load(SEQS + tl.program_id(0))
    h = tl.program_id(1).to(tl.int64)
    q_lo = tl.load(CUQ + seq)
    n_q = tl.load(CUQ + seq + 1) - q_lo
    k_lo = tl.load(CUK + seq)
    n_kv = tl.load(CUK + seq + 1) - k_lo
    offs = tl.arange(0, BLOCK)
    mask_m = offs < n_q
    mask_n = offs < n_kv
    rows_q = _rows(IDXQ, q_lo + offs, mask_m, GATHER_Q)
    rows_k = _rows(IDXK, k_lo + offs, mask_n, GATHER_K)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    q_mask = mask_m[:, None] & mask_d[None, :]
    kv_mask = mask_n[:, None] & mask_d[None, :]
    q = tl.load(Q + rows_q[:, None] * sq_r + h * sq_h + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + rows_q[:, None] * sdo_r + h * sdo_h + offs_d[None, :], mask=q_mask, other=0.0)
    o = tl.load(OUT + rows_q[:, None] * so_r + h * so_h + offs_d[None, :], mask=q_mask, other=0.0)
    k = tl.load(K + rows_k[:, None] * sk_r + h * sk_h + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + rows_k[:, None] * sv_r + h * sv_h + offs_d[None, :], mask=kv_mask, other=0.0)
    lse = tl.load(LSE + rows_q * n_heads + h, mask=mask_m, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # rowsum(dO * O)
    s = _dot(q, tl.trans(k), IEEE) * qk_scale
    p = tl.exp2(s - lse[:, None])
    p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
    dv = _dot(tl.trans(p.to(do.dtype)), do, IEEE)
    dp = _dot(do, tl.trans(v), IEEE)
    ds = p * (dp - delta[:, None])
    dk = _dot(tl.trans(ds.to(q.dtype)), q, IEEE) * sm_scale
    dq = _dot(ds.to(k.dtype), k, IEEE) * sm_scale
    tl.store(DQ + rows_q[:, None] * sdq_r + h * sdq_h + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=q_mask)
    tl.store(DK + rows_k[:, None] * sdk_r + h * sdk_h + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + rows_k[:, None] * sdv_r + h * sdv_h + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _delta_kernel(OUT, DO, DELTA, n_rows, n_heads, so_r, so_h, sdo_r, sdo_h, D,
                  BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """DELTA[t, h] = sum_j O[t, h, j] * DO[t, h, j] in float32, over flat rows r = t * H + h."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = r < n_rows
    t = (r // n_heads).to(tl.int64)
    h = (r % n_heads).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    m = mask_r[:, None] & (offs_d < D)[None, :]
    o = tl.load(OUT + (t * so_r + h * so_h)[:, None] + offs_d[None, :], mask=m, other=0.0).to(tl.float32)
    do = tl.load(DO + (t * sdo_r + h * sdo_h)[:, None] + offs_d[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(DELTA + r, tl.sum(o * do, 1), mask=mask_r)


def _block_table(lens: list[int], block: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per program: (sequence id, first row inside the sequence) for blocks of ``block`` rows."""
    n = torch.tensor(lens, dtype=torch.long)
    nblk = (n + block - 1) // block  # [S]
    seq = torch.repeat_interleave(torch.arange(n.numel()), nblk)  # [P]
    first = torch.cumsum(nblk, 0) - nblk
    start = (torch.arange(seq.numel()) - first[seq]) * block
    return seq.to(device=device, dtype=torch.int32), start.to(device=device, dtype=torch.int32)


def _is_short(plan: VarlenPlan, block: int) -> list[bool]:
    """Sequences handled by the fused backward: 1..block queries and at most block keys."""
    return [0 < a <= block and b <= block for a, b in zip(plan.lens_q, plan.lens_kv)]


def _tables(plan: VarlenPlan, side: str, block: int, device: torch.device, skip_short: int = 0):
    """Block table over the sequences, leaving out the short ones when ``skip_short`` > 0."""

    def build():
        lens = plan.lens_q if side == "q" else plan.lens_kv
        if skip_short > 0:
            lens = [0 if sh else n for n, sh in zip(lens, _is_short(plan, skip_short))]
        return _block_table(lens, block, device)

    return plan.cached(("triton_blocks", side, block, skip_short, device), build)


def _short_seqs(plan: VarlenPlan, block: int, device: torch.device) -> torch.Tensor:
    def build():
        ids = [i for i, sh in enumerate(_is_short(plan, block)) if sh]
        return torch.tensor(ids, dtype=torch.int32).to(device)

    return plan.cached(("triton_short", block, device), build)


def _index(plan: VarlenPlan, which: str, device: torch.device) -> torch.Tensor | None:
    idx = plan.index_q if which == "q" else plan.index_kv
    if idx is None:
        return None
    return plan.cached(("triton_index", which, device), lambda: idx.to(device))


def _meta(q: torch.Tensor) -> dict:
    d = q.shape[-1]
    return {"BLOCK_D": max(16, triton.next_power_of_2(d)), "IEEE": q.dtype == torch.float32}


class _TritonVarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: VarlenPlan, scale: float):
        T_q, H, d = q.shape
        dev = q.device
        cu_q, cu_kv = plan.device_tensors(dev)
        iq, ik = _index(plan, "q", dev), _index(plan, "kv", dev)
        bm, bn, warps = BLOCK_CONFIG["fwd"]
        seq, start = _tables(plan, "q", bm, dev)
        o = torch.empty(T_q, H, d, dtype=q.dtype, device=dev)
        lse = torch.empty(T_q, H, dtype=torch.float32, device=dev)
        if seq.numel() > 0:
            _fwd_kernel[(seq.numel(), H)](
                q, k, v, o, lse, iq if iq is not None else cu_q, ik if ik is not None else cu_kv,
                cu_q, cu_kv, seq, start,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
                H, scale * _LOG2E, d,
                GATHER_Q=iq is not None, GATHER_K=ik is not None, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
                **_meta(q),
            )
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.plan = plan
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        plan: VarlenPlan = ctx.plan
        scale = ctx.scale
        if do.stride(-1) != 1:
            do = do.contiguous()
        T_q, H, d = q.shape
        dev = q.device
        cu_q, cu_kv = plan.device_tensors(dev)
        iq, ik = _index(plan, "q", dev), _index(plan, "kv", dev)
        dq = torch.empty(T_q, H, d, dtype=q.dtype, device=dev)
        dk = torch.empty(k.shape, dtype=k.dtype, device=dev)
        dv = torch.empty(v.shape, dtype=v.dtype, device=dev)
        common = dict(GATHER_Q=iq is not None, GATHER_K=ik is not None, **_meta(q))
        idx_q = iq if iq is not None else cu_q
        idx_k = ik if ik is not None else cu_kv
        fused, _, fused_warps = BLOCK_CONFIG["bwd_fused"]
        if fused > 0:
            short = _short_seqs(plan, fused, dev)
            if short.numel() > 0:
                _bwd_fused_kernel[(short.numel(), H)](
                    q, k, v, o, do, lse, dq, dk, dv, idx_q, idx_k, cu_q, cu_kv, short,
                    q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                    o.stride(0), o.stride(1), do.stride(0), do.stride(1), dq.stride(0), dq.stride(1),
                    dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
                    H, scale * _LOG2E, scale, d, BLOCK=fused, num_warps=fused_warps, **common,
                )
            if short.numel() == sum(1 for n in plan.lens_kv if n > 0):
                return dq, dk, dv, None, None  # every sequence was short
        delta = torch.empty(T_q, H, dtype=torch.float32, device=dev)  # rowsum(dO * O)
        block_d = _meta(q)["BLOCK_D"]
        block_r = max(1, 4096 // block_d)
        if T_q * H > 0:
            _delta_kernel[(triton.cdiv(T_q * H, block_r),)](
                o, do, delta, T_q * H, H, o.stride(0), o.stride(1), do.stride(0), do.stride(1), d,
                BLOCK_R=block_r, BLOCK_D=block_d,
            )
        bm, bn, warps = BLOCK_CONFIG["bwd_kv"]
        seq, start = _tables(plan, "kv", bn, dev, skip_short=fused)
        if seq.numel() > 0:
            _bwd_kv_kernel[(seq.numel(), H)](
                q, k, v, do, lse, delta, dk, dv, idx_q, idx_k, cu_q, cu_kv, seq, start,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                do.stride(0), do.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
                H, scale * _LOG2E, scale, d, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, **common,
            )
        bm, bn, warps = BLOCK_CONFIG["bwd_q"]
        seq, start = _tables(plan, "q", bm, dev, skip_short=fused)
        if seq.numel() > 0:
            _bwd_q_kernel[(seq.numel(), H)](
                q, k, v, do, lse, delta, dq, idx_q, idx_k, cu_q, cu_kv, seq, start,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                do.stride(0), do.stride(1), dq.stride(0), dq.stride(1),
                H, scale * _LOG2E, scale, d, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, **common,
            )
        return dq, dk, dv, None, None


def triton_varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: VarlenPlan, scale: float | None = None
) -> torch.Tensor:
    """q ``[T_q, H, d]``, k/v ``[T_kv, H, d]`` (any row/head strides, unit last stride) -> ``[T_q, H, d]``.

    Every row must belong to exactly one sequence of ``plan`` (true for plans built from full
    offsets and permutation indices), since outputs and gradients are written once per row.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"triton varlen attention: {name} needs a unit stride in its last dim")
    if q.shape[-1] > 256:
        raise ValueError(f"triton varlen attention: head dim {q.shape[-1]} > 256 is not supported")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _TritonVarlenAttention.apply(q, k, v, plan, scale)
