"""Triton flash-attention for gathered variable-length sequences (backend ``triton``; CUDA only).

What it computes is ``attention_with_plan`` (``trellis.modules.attention.varlen``): sequence i attends
from the query rows ``index_q[cu_q[i]:cu_q[i+1]]`` to the key/value rows ``index_kv[cu_kv[i]:cu_kv[i+1]]``
(identity without an index). The kernels read those rows in place and write outputs and gradients
back to them, so windowed attention needs no permuted copy of q, k, v, out or their gradients, and no
padding.

Two families of kernels share the work; each sequence is routed to one of them by its length:

* Window path (short sequences, the swin windows: a surface window of 8^3 cells holds ~10-200
  voxels). One program per sequence and group of heads (by default all heads): it loads the
  sequence's row indices once and then loops over the heads. The sequence has at most ``BLOCK``
  queries and keys, ``BLOCK`` a power of two (32 to 128 by default) picked per sequence from
  ``WINDOW_CONFIG["buckets"]`` (one launch per non-empty bucket, longest sequences first), so the
  softmax is exact in one pass (no online rescaling). Up to 128 the whole sequence is one tile and
  the head loop is software-pipelined (``tl.range(..., num_stages)``): the loads of head h+1 are in
  flight while head h computes. That is the point: a window does little maths per byte, and a
  one-(window, head) program spends most of its time waiting for its first loads. Larger buckets
  load the keys once per head and take the queries in chunks. The backward is one program per
  sequence as well: it computes delta = rowsum(dO * O) in place, as rowsum(P * dP) since the tile
  holds every key of its queries (so O is never read), and writes dQ, dK and dV once each (dK and
  dV accumulate over query chunks in registers), with no atomics and no second pass.
* Long path (sequences longer than the largest bucket, e.g. full attention over an object). One
  program handles one block of up to ``BLOCK_M`` queries of one sequence and one head and loops over
  that sequence's keys in blocks of ``BLOCK_N``, with the online softmax of FlashAttention (Dao et al.
  2022, arXiv:2205.14135). The backward follows FlashAttention-2 (Dao 2023, arXiv:2307.08691): one
  kernel per key block accumulates dK and dV over the query blocks, one per query block accumulates
  dQ; every output row has one owner, so there are no atomics. Sequences that fit one tile of
  ``BLOCK_CONFIG["bwd_fused"]`` and are not taken by the window path get a fused one-program
  backward per (sequence, head). Mid-length sequences (up to ``MID_CONFIG["max_len"]``, the densest
  swin windows) get launches of their own with smaller blocks, so that less of each tile is padding.

``VARIANTS`` names whole configurations (the window path's settings and the long path's blocks) so
that the benchmark can compare them in one run; ``use_variant`` switches. ``"old"`` is the code path
before the window path exactly; ``DEFAULT_VARIANT`` ("win_split") is what the module starts with.

``triton_packed_attention`` takes q, k, v as one ``[N, 3, H, d]`` tensor and returns its gradient as
one ``[N, 3, H, d]`` buffer that the kernels write directly; with three separate views autograd would
``torch.stack`` the three gradients into a new tensor (one more read and write of the gradient).

Importing this module imports Triton; ``varlen.py`` imports it only when the backend is selected.
"""

from __future__ import annotations

import copy
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from trellis.modules.attention.varlen import VarlenPlan

__all__ = ["triton_varlen_attention", "triton_packed_attention", "BLOCK_CONFIG", "BLOCK_CONFIG_16BIT_D64",
           "WINDOW_CONFIG", "WindowBucket", "check_buckets",
           "VARIANTS", "DEFAULT_VARIANT", "use_variant"]

# Long path: (BLOCK_M, BLOCK_N, num_warps) for the forward and the two backward kernels.
# "bwd_fused": (BLOCK, BLOCK, num_warps): sequences with at most BLOCK queries and keys that the window
# path does not take get the one-program-per-(sequence, head) backward; BLOCK 0 disables it.
BLOCK_CONFIG = {"fwd": (64, 64, 4), "bwd_kv": (64, 64, 4), "bwd_q": (64, 64, 4), "bwd_fused": (64, 64, 4)}
# The long path's blocks for 16-bit inputs with head dim <= 64 (the flow and VAE transformers): larger
# tiles, from a sweep on an H200 (docs/PERFORMANCE_attention.md, 2026-11-26: full attention over 2k-8k
# tokens and cross-attention: forward -7%, fwd+bwd -5% from the dK/dV tiles). Float32 and wider heads keep
# BLOCK_CONFIG (larger tiles there would exceed shared memory or spill).
BLOCK_CONFIG_16BIT_D64 = {"fwd": (128, 64, 4), "bwd_kv": (128, 128, 8), "bwd_q": (128, 64, 4)}
_TUNED_16BIT_D64 = dict(BLOCK_CONFIG_16BIT_D64)
# Mid-length sequences: longer than the window path's largest bucket (or not on the window path) but at
# most "max_len" (the densest swin windows, 129-256 voxels at swin-8 on surfaces): the long path's
# kernels with these blocks, in launches of their own. Small blocks pad a 150-voxel window to 192 rows
# instead of 256. "max_len" 0: none, every such sequence takes the long-path blocks above.
MID_CONFIG = {"max_len": 256, "fwd": (64, 64, 4), "bwd_kv": (64, 64, 4), "bwd_q": (64, 64, 4)}
_DEFAULT_MID = dict(MID_CONFIG)


def _long_blocks(kind: str, q: torch.Tensor, mid: bool = False) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of a long-path kernel for inputs like ``q`` (``mid``: for the
    mid-length sequences)."""
    if mid:
        return MID_CONFIG[kind]
    if q.element_size() == 2 and q.shape[-1] <= 64 and kind in BLOCK_CONFIG_16BIT_D64:
        return BLOCK_CONFIG_16BIT_D64[kind]
    return BLOCK_CONFIG[kind]


class WindowBucket(NamedTuple):
    """One length bucket of the window path: sequences with max(queries, keys) <= ``block`` that no
    smaller bucket takes. ``fwd_m`` / ``bwd_m``: query chunk of the forward / backward tile, a power
    of two from 16 to ``block``. At ``block`` the whole sequence is one tile and the head loop is
    software-pipelined; below it the keys are loaded once per head and the queries taken in chunks
    (the backward accumulates dK and dV over them in registers), and the chunk loop is pipelined.
    ``stages``: ``num_stages`` of the pipelined loop (1 = none); each stage holds one iteration's
    q, k, v (and O, dO) tiles in shared memory. ``fwd_split``: with ``fwd_m < block``, the forward of
    2-byte inputs runs each query chunk in a program of its own (the grid has block / fwd_m programs per
    sequence, each loading the keys again) instead of looping over the chunks; its head loop is then
    pipelined. Float32 inputs on the GPU keep the chunk loop (``_split_for``)."""

    block: int
    fwd_m: int
    fwd_warps: int
    bwd_m: int
    bwd_warps: int
    stages: int = 2
    fwd_split: int = 0


def _buckets(*rows: tuple) -> tuple[WindowBucket, ...]:
    return tuple(WindowBucket(*r) for r in rows)


_B16, _B32, _B64, _B128, _B256 = _buckets(
    (16, 16, 2, 16, 2), (32, 32, 4, 32, 4), (64, 64, 4, 64, 4), (128, 128, 8, 128, 8), (256, 32, 8, 32, 8))
# The 128 bucket of "win_split": forward in query chunks of 64, each chunk a program of 4 warps (session 7,
# H200: that launch 256 -> 203-210 us on the 8-object swin workload, forward + backward -3%); backward one
# 128 x 128 tile of 8 warps. The default since session 8 (its float16 and bfloat16 GPU tests pass).
_B128S = WindowBucket(128, 64, 4, 128, 8, 2, 1)
# No 16 bucket by default: windows of <= 16 voxels carry ~0.2% of the FLOPs of a surface workload and
# cost no more bytes in a 32 tile (masked rows are not loaded), while each bucket is one more launch.
# The 256 bucket with two pipeline stages needs more shared memory than the card has for head dim > 64,
# so only "win_s1" (one stage) and "win256" (head dim <= 64 only) have it. (It also gave wrong
# gradients in bf16 until the backward's query-chunk loop stopped being pipelined, see _win_bwd_kernel.)
_DEFAULT_BUCKETS = (_B32, _B64, _B128)

# Window path. "buckets": increasing ``WindowBucket``s; an empty tuple turns the path off. "heads":
# heads per program: 0 = all of them (one program per sequence), 1 = one program per (sequence, head),
# "auto" = per bucket, the most heads that still give ``AUTO_PROGRAMS_PER_SM`` x (number of SMs)
# programs (a bucket of few windows in programs of all 12 heads would leave SMs idle; the buckets
# are separate launches, so one bucket's tail is not filled by the next).
# "delta_from_p" (default True): the one-tile backwards take delta = rowsum(dO * O) as rowsum(P * dP)
# and never read O. The window path is on by default since session 7 ("win"): on an H100 its kernels
# took 1.54 ms of GPU time for forward + backward of the 8-object swin-8 workload against 2.38 ms for
# "old" (docs/PERFORMANCE_attention.md). Set by ``use_variant(DEFAULT_VARIANT)`` below.
WINDOW_CONFIG: dict = {}
AUTO_PROGRAMS_PER_SM = 4


def _variant(blocks: dict | None = None, mid: dict | None = None, **window) -> dict:
    return {"window": {"buckets": _DEFAULT_BUCKETS, "heads": "auto", **window},
            "blocks": copy.deepcopy(blocks or BLOCK_CONFIG), "mid": {**_DEFAULT_MID, **(mid or {})}}


def _stages(buckets: tuple[WindowBucket, ...], stages: int, max_block: int = 1 << 30) -> tuple[WindowBucket, ...]:
    return tuple(b._replace(stages=stages) if b.block <= max_block else b for b in buckets)


# Named configurations for the benchmark (``scripts/bench_attention.py --triton-variants``);
# ``DEFAULT_VARIANT`` is what the module starts with (``MID_CONFIG`` and ``BLOCK_CONFIG`` as above).
# (Registers and spills per kernel, sm_90, ptxas: see docs/PERFORMANCE_attention.md.)
VARIANTS: dict[str, dict] = {
    "old": _variant(buckets=(), mid={"max_len": 0}, delta_from_p=False),  # the code before the window path
    "old_mid": _variant(buckets=()),  # "old" with mid-length blocks and delta from P in the fused backward
    "win": _variant(),  # window path, buckets 32-128, two pipeline stages, heads per program "auto"
    "win_s1": _variant(buckets=_stages((_B32, _B64, _B128, _B256), 1)),  # nothing pipelined, up to 256
    "win_max64": _variant(buckets=(_B32, _B64)),  # windows over 64 on the per-(window, head) kernels
    "win256": _variant(buckets=(_B32, _B64, _B128, _B256)),  # "win" plus the 256 bucket; head dim <= 64
    "win_o": _variant(delta_from_p=False),  # "win" with the backward reading O for delta
    "win_nomid": _variant(mid={"max_len": 0}),  # "win" with the long-path blocks for windows over 128
    "win_split": _variant(buckets=(_B32, _B64, _B128S)),  # "win" with the 128 bucket's forward split (above)
}
DEFAULT_VARIANT = "win_split"


def use_variant(name: str) -> None:
    """Set ``WINDOW_CONFIG``, ``BLOCK_CONFIG`` and ``MID_CONFIG`` to the named entry of ``VARIANTS`` (in
    place), and ``BLOCK_CONFIG_16BIT_D64`` back to its tuned values."""
    if name not in VARIANTS:
        raise ValueError(f"unknown triton attention variant {name!r}; known: {list(VARIANTS)}")
    v = copy.deepcopy(VARIANTS[name])
    WINDOW_CONFIG.clear()
    WINDOW_CONFIG.update(v["window"])
    BLOCK_CONFIG.clear()
    BLOCK_CONFIG.update(v["blocks"])
    BLOCK_CONFIG_16BIT_D64.clear()
    BLOCK_CONFIG_16BIT_D64.update(_TUNED_16BIT_D64)
    MID_CONFIG.clear()
    MID_CONFIG.update(v["mid"])


use_variant(DEFAULT_VARIANT)
_LOG2E = 1.4426950408889634


@triton.jit
def _rows(IDX, pos, mask, GATHER: tl.constexpr):
    if GATHER:
        r = tl.load(IDX + pos, mask=mask, other=0)
    else:
        r = pos
    return r.to(tl.int64)


@triton.jit
def _bounds(CUQ, CUK, seq):
    """(first query row, queries, first key row, keys) of sequence ``seq``."""
    q_lo = tl.load(CUQ + seq)
    k_lo = tl.load(CUK + seq)
    return q_lo, tl.load(CUQ + seq + 1) - q_lo, k_lo, tl.load(CUK + seq + 1) - k_lo


@triton.jit
def _tile(PTR, rows, h, s_r, s_h, offs_d, mask):
    """``[R, BLOCK_D]`` tile of head ``h`` at row indices ``rows`` (zeros where masked)."""
    return tl.load(PTR + rows[:, None] * s_r + h * s_h + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _store_tile(PTR, rows, h, s_r, s_h, offs_d, x, mask):
    tl.store(PTR + rows[:, None] * s_r + h * s_h + offs_d[None, :], x.to(PTR.dtype.element_ty), mask=mask)


@triton.jit
def _row_stat(PTR, rows, h, n_heads, mask):
    """Per-(row, head) float32 statistic (LSE, delta) laid out ``[T, H]``."""
    return tl.load(PTR + rows * n_heads + h, mask=mask, other=0.0)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _block(IDX, lo, start, n, BLOCK: tl.constexpr, GATHER: tl.constexpr):
    """Rows ``start .. start + BLOCK`` of a sequence of ``n`` rows that begins at row ``lo``:
    (mask, row indices)."""
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    return mask, _rows(IDX, lo + offs, mask, GATHER)


@triton.jit
def _probs(q, k, lse, mask_m, mask_n, qk_scale, IEEE: tl.constexpr):
    """Backward tile ``[BM, BN]``: P recomputed from the log2-domain LSE, zero outside the masks."""
    s = _dot(q, tl.trans(k), IEEE) * qk_scale
    return tl.where(mask_m[:, None] & mask_n[None, :], tl.exp2(s - lse[:, None]), 0.0)


@triton.jit
def _dscores(p, do, v, delta, IEEE: tl.constexpr):
    """dS = P * (dO V^T - delta) (before the softmax scale)."""
    return p * (_dot(do, tl.trans(v), IEEE) - delta[:, None])


# ----------------------------------------------------------------------------- long path
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
    q_lo, n_q, k_lo, n_kv = _bounds(CUQ, CUK, seq)
    mask_m, rows_q = _block(IDXQ, q_lo, m0, n_q, BLOCK_M, GATHER_Q)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    q = _tile(Q, rows_q, h, sq_r, sq_h, offs_d, mask_m[:, None] & mask_d[None, :])
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, n_kv, BLOCK_N):
        mask_n, rows_k = _block(IDXK, k_lo, n0, n_kv, BLOCK_N, GATHER_K)
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = _tile(K, rows_k, h, sk_r, sk_h, offs_d, kv_mask)
        v = _tile(V, rows_k, h, sv_r, sv_h, offs_d, kv_mask)
        s = _dot(q, tl.trans(k), IEEE) * qk_scale  # [BM, BN], log2 units
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    acc = acc / l_i[:, None]
    _store_tile(OUT, rows_q, h, so_r, so_h, offs_d, acc, mask_m[:, None] & mask_d[None, :])
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
    q_lo, n_q, k_lo, n_kv = _bounds(CUQ, CUK, seq)
    mask_n, rows_k = _block(IDXK, k_lo, n0, n_kv, BLOCK_N, GATHER_K)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    kv_mask = mask_n[:, None] & mask_d[None, :]
    k = _tile(K, rows_k, h, sk_r, sk_h, offs_d, kv_mask)
    v = _tile(V, rows_k, h, sv_r, sv_h, offs_d, kv_mask)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for m0 in range(0, n_q, BLOCK_M):
        mask_m, rows_q = _block(IDXQ, q_lo, m0, n_q, BLOCK_M, GATHER_Q)
        q_mask = mask_m[:, None] & mask_d[None, :]
        q = _tile(Q, rows_q, h, sq_r, sq_h, offs_d, q_mask)
        do = _tile(DO, rows_q, h, sdo_r, sdo_h, offs_d, q_mask)
        lse = _row_stat(LSE, rows_q, h, n_heads, mask_m)
        delta = _row_stat(DELTA, rows_q, h, n_heads, mask_m)
        p = _probs(q, k, lse, mask_m, mask_n, qk_scale, IEEE)  # [BM, BN]
        dv += _dot(tl.trans(p.to(do.dtype)), do, IEEE)  # before dS: fewer live registers (no spill at 128x128)
        ds = _dscores(p, do, v, delta, IEEE)
        dk += _dot(tl.trans(ds.to(q.dtype)), q, IEEE)
    dk = dk * sm_scale
    _store_tile(DK, rows_k, h, sdk_r, sdk_h, offs_d, dk, kv_mask)
    _store_tile(DV, rows_k, h, sdv_r, sdv_h, offs_d, dv, kv_mask)


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
    q_lo, n_q, k_lo, n_kv = _bounds(CUQ, CUK, seq)
    mask_m, rows_q = _block(IDXQ, q_lo, m0, n_q, BLOCK_M, GATHER_Q)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    q_mask = mask_m[:, None] & mask_d[None, :]
    q = _tile(Q, rows_q, h, sq_r, sq_h, offs_d, q_mask)
    do = _tile(DO, rows_q, h, sdo_r, sdo_h, offs_d, q_mask)
    lse = _row_stat(LSE, rows_q, h, n_heads, mask_m)
    delta = _row_stat(DELTA, rows_q, h, n_heads, mask_m)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, n_kv, BLOCK_N):
        mask_n, rows_k = _block(IDXK, k_lo, n0, n_kv, BLOCK_N, GATHER_K)
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = _tile(K, rows_k, h, sk_r, sk_h, offs_d, kv_mask)
        v = _tile(V, rows_k, h, sv_r, sv_h, offs_d, kv_mask)
        ds = _dscores(_probs(q, k, lse, mask_m, mask_n, qk_scale, IEEE), do, v, delta, IEEE)
        dq += _dot(ds.to(k.dtype), k, IEEE)
    dq = dq * sm_scale
    _store_tile(DQ, rows_q, h, sdq_r, sdq_h, offs_d, dq, q_mask)


@triton.jit
def _bwd_fused_kernel(
    Q, K, V, OUT, DO, LSE, DQ, DK, DV, IDXQ, IDXK, CUQ, CUK, SEQS,
    sq_r, sq_h, sk_r, sk_h, sv_r, sv_h, so_r, so_h, sdo_r, sdo_h, sdq_r, sdq_h, sdk_r, sdk_h, sdv_r, sdv_h,
    n_heads, qk_scale, sm_scale, D,
    GATHER_Q: tl.constexpr, GATHER_K: tl.constexpr, IEEE: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, DELTA_FROM_P: tl.constexpr,
):
    """Whole backward of one short sequence (<= BLOCK queries and keys) and one head in one program."""
    seq = tl.load(SEQS + tl.program_id(0))
    h = tl.program_id(1).to(tl.int64)
    q_lo, n_q, k_lo, n_kv = _bounds(CUQ, CUK, seq)
    offs = tl.arange(0, BLOCK)
    mask_m = offs < n_q
    mask_n = offs < n_kv
    rows_q = _rows(IDXQ, q_lo + offs, mask_m, GATHER_Q)
    rows_k = _rows(IDXK, k_lo + offs, mask_n, GATHER_K)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    q_mask = mask_m[:, None] & mask_d[None, :]
    kv_mask = mask_n[:, None] & mask_d[None, :]
    q = _tile(Q, rows_q, h, sq_r, sq_h, offs_d, q_mask)
    do = _tile(DO, rows_q, h, sdo_r, sdo_h, offs_d, q_mask)
    k = _tile(K, rows_k, h, sk_r, sk_h, offs_d, kv_mask)
    v = _tile(V, rows_k, h, sv_r, sv_h, offs_d, kv_mask)
    lse = _row_stat(LSE, rows_q, h, n_heads, mask_m)
    p = _probs(q, k, lse, mask_m, mask_n, qk_scale, IEEE)
    dv = _dot(tl.trans(p.to(do.dtype)), do, IEEE)
    if DELTA_FROM_P:  # all keys in one tile: rowsum(dO * O) = rowsum(P * dO V^T), no read of O
        dp = _dot(do, tl.trans(v), IEEE)
        ds = p * (dp - tl.sum(p * dp, 1)[:, None])
    else:
        o = _tile(OUT, rows_q, h, so_r, so_h, offs_d, q_mask)
        ds = _dscores(p, do, v, tl.sum(do.to(tl.float32) * o.to(tl.float32), 1), IEEE)
    dk = _dot(tl.trans(ds.to(q.dtype)), q, IEEE) * sm_scale
    dq = _dot(ds.to(k.dtype), k, IEEE) * sm_scale
    _store_tile(DQ, rows_q, h, sdq_r, sdq_h, offs_d, dq, q_mask)
    _store_tile(DK, rows_k, h, sdk_r, sdk_h, offs_d, dk, kv_mask)
    _store_tile(DV, rows_k, h, sdv_r, sdv_h, offs_d, dv, kv_mask)


# ----------------------------------------------------------------------------- window path
@triton.jit
def _mask_rows(mask_r, offs_d, D, EVEN_D: tl.constexpr):
    """Load/store mask of a tile of rows: ``[R, 1]`` (broadcast) when the head dim fills BLOCK_D."""
    if EVEN_D:
        return mask_r[:, None]
    else:
        return mask_r[:, None] & (offs_d < D)[None, :]


@triton.jit
def _win_prologue(SEQS, slot, CUQ, CUK, IDXK, heads_per_prog, n_heads, D, GATHER_K: tl.constexpr,
                  EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's heads [h_lo, h_hi), the query range of its sequence (``SEQS[slot]``) and its whole
    key tile (mask, rows, load mask)."""
    seq = tl.load(SEQS + slot)
    h_lo = tl.program_id(1) * heads_per_prog
    h_hi = tl.minimum(h_lo + heads_per_prog, n_heads)
    q_lo, n_q, k_lo, n_kv = _bounds(CUQ, CUK, seq)
    mask_n, rows_k = _block(IDXK, k_lo, 0, n_kv, BLOCK_N, GATHER_K)
    return h_lo, h_hi, q_lo, n_q, mask_n, rows_k, _mask_rows(mask_n, tl.arange(0, BLOCK_D), D, EVEN_D)


@triton.jit
def _win_fwd_tile(
    Q, OUT, LSE, rows_q, mask_m, h, k, v, mask_n, offs_d, D, sq_r, sq_h, so_r, so_h, n_heads, qk_scale,
    IEEE: tl.constexpr, EVEN_D: tl.constexpr,
):
    """Forward of one query chunk and one head against all keys of the sequence (one-pass softmax)."""
    q_mask = _mask_rows(mask_m, offs_d, D, EVEN_D)
    q = _tile(Q, rows_q, h, sq_r, sq_h, offs_d, q_mask)
    s = _dot(q, tl.trans(k), IEEE) * qk_scale  # [BM, BN], log2 units
    s = tl.where(mask_n[None, :], s, float("-inf"))
    m = tl.max(s, 1)
    p = tl.exp2(s - m[:, None])
    den = tl.sum(p, 1)
    o = _dot(p.to(v.dtype), v, IEEE) / den[:, None]
    _store_tile(OUT, rows_q, h, so_r, so_h, offs_d, o, q_mask)
    tl.store(LSE + rows_q * n_heads + h, m + tl.log2(den), mask=mask_m)


@triton.jit
def _win_fwd_kernel(
    Q, K, V, OUT, LSE, IDXQ, IDXK, CUQ, CUK, SEQS,
    sq_r, sq_h, sk_r, sk_h, sv_r, sv_h, so_r, so_h,
    n_heads, heads_per_prog, qk_scale, D,
    GATHER_Q: tl.constexpr, GATHER_K: tl.constexpr, IEEE: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """Forward of one whole sequence (<= BLOCK_N queries and keys) for heads [h_lo, h_hi).

    Key row indices are loaded once, before the head loop; so are the query rows when the queries
    fit one tile (BLOCK_M == BLOCK_N), else each head loops over chunks of BLOCK_M queries. With
    SPLIT, program p takes query chunk p % (BLOCK_N // BLOCK_M) of sequence SEQS[p // that] alone.
    """
    if SPLIT:
        slot = tl.program_id(0) // (BLOCK_N // BLOCK_M)
        m0 = (tl.program_id(0) % (BLOCK_N // BLOCK_M)) * BLOCK_M
    else:
        slot = tl.program_id(0)
        m0 = 0
    h_lo, h_hi, q_lo, n_q, mask_n, rows_k, kv_mask = _win_prologue(
        SEQS, slot, CUQ, CUK, IDXK, heads_per_prog, n_heads, D, GATHER_K, EVEN_D, BLOCK_N, BLOCK_D)
    offs_d = tl.arange(0, BLOCK_D)
    offs_m = tl.arange(0, BLOCK_M)
    if BLOCK_M == BLOCK_N or SPLIT:  # one query tile per program and head; the head loop is pipelined
        mask_m = m0 + offs_m < n_q
        rows_q = _rows(IDXQ, q_lo + m0 + offs_m, mask_m, GATHER_Q)
        h_end = tl.where(m0 < n_q, h_hi, h_lo)  # a chunk past the sequence's queries has nothing to do
        for h in tl.range(h_lo, h_end, num_stages=STAGES):
            k = _tile(K, rows_k, h, sk_r, sk_h, offs_d, kv_mask)
            v = _tile(V, rows_k, h, sv_r, sv_h, offs_d, kv_mask)
            _win_fwd_tile(Q, OUT, LSE, rows_q, mask_m, h, k, v, mask_n, offs_d, D, sq_r, sq_h, so_r, so_h,
                          n_heads, qk_scale, IEEE, EVEN_D)
    else:  # keys loaded once per head, queries in chunks; the chunk loop is pipelined
        for h in tl.range(h_lo, h_hi, num_stages=1):
            k = _tile(K, rows_k, h, sk_r, sk_h, offs_d, kv_mask)
            v = _tile(V, rows_k, h, sv_r, sv_h, offs_d, kv_mask)
            for m0 in tl.range(0, n_q, BLOCK_M, num_stages=STAGES):
                mask_m = m0 + offs_m < n_q
                rows_q = _rows(IDXQ, q_lo + m0 + offs_m, mask_m, GATHER_Q)
                _win_fwd_tile(Q, OUT, LSE, rows_q, mask_m, h, k, v, mask_n, offs_d, D, sq_r, sq_h, so_r, so_h,
                              n_heads, qk_scale, IEEE, EVEN_D)


@triton.jit
def _win_bwd_tile(
    Q, OUT, DO, LSE, DQ, rows_q, mask_m, h, k, v, mask_n, offs_d, D,
    sq_r, sq_h, so_r, so_h, sdo_r, sdo_h, sdq_r, sdq_h, n_heads, qk_scale, sm_scale,
    IEEE: tl.constexpr, EVEN_D: tl.constexpr, DELTA_FROM_P: tl.constexpr,
):
    """Backward of one query chunk and one head: stores dQ, returns its (dK / scale, dV) contributions."""
    q_mask = _mask_rows(mask_m, offs_d, D, EVEN_D)
    do = _tile(DO, rows_q, h, sdo_r, sdo_h, offs_d, q_mask)
    if DELTA_FROM_P:
        dp = _dot(do, tl.trans(v), IEEE)
    else:
        # dP - delta first, so dO and O leave registers before the score tile is live (no spills at 128x128)
        o = _tile(OUT, rows_q, h, so_r, so_h, offs_d, q_mask)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # rowsum(dO * O)
        dp = _dot(do, tl.trans(v), IEEE) - delta[:, None]
    q = _tile(Q, rows_q, h, sq_r, sq_h, offs_d, q_mask)
    lse = _row_stat(LSE, rows_q, h, n_heads, mask_m)
    s = _dot(q, tl.trans(k), IEEE) * qk_scale
    # Padded query rows have q = dO = O = 0 and lse 0: p = 1 there but dV, dP and so dS get nothing
    # from them. Padded keys (k = 0, s = 0) must be masked: exp2(-lse) may overflow.
    p = tl.where(mask_n[None, :], tl.exp2(s - lse[:, None]), 0.0)
    if DELTA_FROM_P:
        # the tile holds every key of these queries, so delta = rowsum(dO * O) = rowsum(P * dO V^T):
        # no read of O (an eighth of the backward's traffic)
        dp = dp - tl.sum(p * dp, 1)[:, None]
    dv = _dot(tl.trans(p.to(do.dtype)), do, IEEE)
    ds = (p * dp).to(q.dtype)
    dq = _dot(ds, k, IEEE) * sm_scale
    _store_tile(DQ, rows_q, h, sdq_r, sdq_h, offs_d, dq, q_mask)
    dk = _dot(tl.trans(ds), q, IEEE)
    return dk, dv


@triton.jit
def _win_bwd_kernel(
    Q, K, V, OUT, DO, LSE, DQ, DK, DV, IDXQ, IDXK, CUQ, CUK, SEQS,
    sq_r, sq_h, sk_r, sk_h, sv_r, sv_h, so_r, so_h, sdo_r, sdo_h, sdq_r, sdq_h, sdk_r, sdk_h, sdv_r, sdv_h,
    n_heads, heads_per_prog, qk_scale, sm_scale, D,
    GATHER_Q: tl.constexpr, GATHER_K: tl.constexpr, IEEE: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr,
    DELTA_FROM_P: tl.constexpr,
):
    """Whole backward of one sequence (<= BLOCK_N queries and keys) for heads [h_lo, h_hi): dQ, dK and
    dV written once each; with BLOCK_M < BLOCK_N, dK and dV accumulate in registers over query chunks."""
    h_lo, h_hi, q_lo, n_q, mask_n, rows_k, kv_mask = _win_prologue(
        SEQS, tl.program_id(0), CUQ, CUK, IDXK, heads_per_prog, n_heads, D, GATHER_K, EVEN_D, BLOCK_N, BLOCK_D)
    offs_d = tl.arange(0, BLOCK_D)
    offs_m = tl.arange(0, BLOCK_M)
    if BLOCK_M == BLOCK_N:  # one tile per head; the head loop is pipelined
        mask_m = offs_m < n_q
        rows_q = _rows(IDXQ, q_lo + offs_m, mask_m, GATHER_Q)
        for h in tl.range(h_lo, h_hi, num_stages=STAGES):
            k = _tile(K, rows_k, h, sk_r, sk_h, offs_d, kv_mask)
            v = _tile(V, rows_k, h, sv_r, sv_h, offs_d, kv_mask)
            dk, dv = _win_bwd_tile(Q, OUT, DO, LSE, DQ, rows_q, mask_m, h, k, v, mask_n, offs_d, D,
                                   sq_r, sq_h, so_r, so_h, sdo_r, sdo_h, sdq_r, sdq_h, n_heads, qk_scale, sm_scale,
                                   IEEE, EVEN_D, DELTA_FROM_P)
            _store_tile(DK, rows_k, h, sdk_r, sdk_h, offs_d, (dk * sm_scale), kv_mask)
            _store_tile(DV, rows_k, h, sdv_r, sdv_h, offs_d, dv, kv_mask)
    else:  # keys once per head, dK and dV accumulated over query chunks
        # The chunk loop is not pipelined: with num_stages=2, Triton 3.6 gave wrong gradients on an H200
        # for chunks of 32 at 128 and 256 keys, and for chunks of 64 with 8 warps (2026-11-26); with one
        # stage all were correct, and unpipelined chunks were not slower in the same sweep
        # (docs/PERFORMANCE_attention.md, session 6).
        for h in tl.range(h_lo, h_hi, num_stages=1):
            k = _tile(K, rows_k, h, sk_r, sk_h, offs_d, kv_mask)
            v = _tile(V, rows_k, h, sv_r, sv_h, offs_d, kv_mask)
            dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            for m0 in tl.range(0, n_q, BLOCK_M, num_stages=1):
                mask_m = m0 + offs_m < n_q
                rows_q = _rows(IDXQ, q_lo + m0 + offs_m, mask_m, GATHER_Q)
                dk_c, dv_c = _win_bwd_tile(Q, OUT, DO, LSE, DQ, rows_q, mask_m, h, k, v, mask_n, offs_d, D,
                                           sq_r, sq_h, so_r, so_h, sdo_r, sdo_h, sdq_r, sdq_h, n_heads, qk_scale,
                                           sm_scale, IEEE, EVEN_D, DELTA_FROM_P)
                dk += dk_c
                dv += dv_c
            _store_tile(DK, rows_k, h, sdk_r, sdk_h, offs_d, (dk * sm_scale), kv_mask)
            _store_tile(DV, rows_k, h, sdv_r, sdv_h, offs_d, dv, kv_mask)


# ----------------------------------------------------------------------------- shared
@triton.jit
def _delta_kernel(OUT, DO, DELTA, ROWS, n_flat, n_heads, so_r, so_h, sdo_r, sdo_h, D,
                  GATHER: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """DELTA[t, h] = sum_j O[t, h, j] * DO[t, h, j] in float32, over flat positions r = i * H + h with
    t = ROWS[i] (GATHER) or t = i."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = r < n_flat
    t = _rows(ROWS, r // n_heads, mask_r, GATHER)
    h = (r % n_heads).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    m = mask_r[:, None] & (offs_d < D)[None, :]
    o = tl.load(OUT + (t * so_r + h * so_h)[:, None] + offs_d[None, :], mask=m, other=0.0).to(tl.float32)
    do = tl.load(DO + (t * sdo_r + h * sdo_h)[:, None] + offs_d[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(DELTA + t * n_heads + h, tl.sum(o * do, 1), mask=mask_r)


# ----------------------------------------------------------------------------- host side
_FUSED, _LONG, _EMPTY, _MID = -1, -2, -3, -4  # routes besides a window bucket index


_CHECKED_BUCKETS: dict = {}


def _window_buckets() -> tuple[WindowBucket, ...]:
    """``WINDOW_CONFIG["buckets"]``, checked (once per configured value: every call reads it twice)."""
    raw = WINDOW_CONFIG["buckets"]
    try:
        return _CHECKED_BUCKETS[raw]
    except KeyError:
        _CHECKED_BUCKETS[raw] = buckets = check_buckets(raw)
        return buckets
    except TypeError:  # an unhashable value (e.g. a list): checked every time
        return check_buckets(raw)


def check_buckets(rows) -> tuple[WindowBucket, ...]:
    """``rows`` (``WindowBucket``s or tuples of their fields) as buckets; ValueError if one is invalid."""
    buckets = tuple(WindowBucket(*b) for b in rows)
    prev = 0
    for b in buckets:
        if b.block < 16 or b.block & (b.block - 1) or b.block <= prev:
            raise ValueError(f"window buckets {buckets}: block must be increasing powers of two >= 16")
        for m in (b.fwd_m, b.bwd_m):
            if m < 16 or m & (m - 1) or m > b.block:
                raise ValueError(f"window bucket {b}: fwd_m and bwd_m must be powers of two from 16 to block")
        if b.stages < 1:
            raise ValueError(f"window bucket {b}: stages must be >= 1")
        if b.fwd_split not in (0, 1):
            raise ValueError(f"window bucket {b}: fwd_split must be 0 or 1")
        prev = b.block
    return buckets


def _block_table(lens: list[int], block: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per program: (sequence id, first row inside the sequence) for blocks of ``block`` rows."""
    n = torch.tensor(lens, dtype=torch.long)
    nblk = (n + block - 1) // block  # [S]
    seq = torch.repeat_interleave(torch.arange(n.numel()), nblk)  # [P]
    first = torch.cumsum(nblk, 0) - nblk
    start = (torch.arange(seq.numel()) - first[seq]) * block
    return seq.to(device=device, dtype=torch.int32), start.to(device=device, dtype=torch.int32)


class _Routing:
    """Which kernels handle which sequences of a plan, with the launch tables (cached on the plan).

    Route of a sequence with a queries and b keys: the first window bucket with max(a, b) <= BLOCK;
    else the fused long-path backward if 0 < a, b <= ``fused``; else the two-kernel long path, with
    the mid-length blocks if max(a, b) <= ``mid``. Sequences with no keys (and so no queries) need
    nothing. The long-path forward also computes the fused sequences (with the mid-length blocks when
    there are such).
    """

    def __init__(self, plan: VarlenPlan, blocks: tuple[int, ...], fused: int, mid: int, device: torch.device):
        # the plan's lengths and row index, not the plan itself (this object lives in the plan's cache)
        self.lens_q, self.lens_kv, self.cu_q, self.index_q = plan.lens_q, plan.lens_kv, plan.cu_q, plan.index_q
        self.device, self.window_on = device, bool(blocks)
        routes = []
        for a, b in zip(plan.lens_q, plan.lens_kv):
            r = _EMPTY if b == 0 else next((i for i, blk in enumerate(blocks) if max(a, b) <= blk), None)
            if r is None:
                r = _FUSED if 0 < a <= fused and b <= fused else _MID if max(a, b) <= mid else _LONG
            routes.append(r)
        self.routes = routes
        size = [max(a, b) for a, b in zip(plan.lens_q, plan.lens_kv)]
        self.win: list[tuple[int, torch.Tensor]] = []  # (bucket, sequence ids), largest bucket first
        for i in reversed(range(len(blocks))):
            ids = sorted((s for s, r in enumerate(routes) if r == i), key=lambda s: -size[s])  # longest first
            if ids:
                self.win.append((i, torch.tensor(ids, dtype=torch.int32).to(device)))
        self.fused = torch.tensor([s for s, r in enumerate(routes) if r == _FUSED], dtype=torch.int32).to(device)
        self.n_long = sum(1 for r in routes if r in (_LONG, _MID))
        # long-path launches: (with the mid-length blocks?, routes of the forward, routes of the backward)
        self.long_groups = [(True, (_FUSED, _MID), (_MID,)), (False, (_LONG,), (_LONG,))] if mid > 0 \
            else [(False, (_FUSED, _LONG), (_LONG,))]
        self._tables: dict = {}

    def table(self, which: str, block: int, keep: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Long-path block table of the sequences with a route in ``keep``: ``"fwd"`` (query blocks of
        the forward), ``"kv"`` / ``"q"`` (key / query blocks of the backward)."""
        key = (which, block, keep)
        if key not in self._tables:
            lens = self.lens_kv if which == "kv" else self.lens_q
            self._tables[key] = _block_table([n if r in keep else 0 for n, r in zip(lens, self.routes)], block,
                                             self.device)
        return self._tables[key]

    def delta_rows(self) -> torch.Tensor | None:
        """Query rows of the long sequences (the only rows whose delta the long path reads); None = all
        rows (with the window path off, as before it)."""
        if not self.window_on:
            return None
        if "delta" not in self._tables:
            cu = self.cu_q.cpu().long()
            parts = [torch.arange(int(cu[s]), int(cu[s + 1])) for s, r in enumerate(self.routes)
                     if r in (_LONG, _MID)]
            pos = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
            idx = self.index_q
            rows = pos if idx is None else idx.cpu()[pos]
            self._tables["delta"] = rows.to(self.device)
        return self._tables["delta"]


def _routing(plan: VarlenPlan, device: torch.device, buckets: tuple[WindowBucket, ...]) -> _Routing:
    blocks = tuple(b.block for b in buckets)
    fused, mid = BLOCK_CONFIG["bwd_fused"][0], int(MID_CONFIG["max_len"])
    return plan.cached(("triton_routing", blocks, fused, mid, device),
                       lambda: _Routing(plan, blocks, fused, mid, device))


def _index(plan: VarlenPlan, which: str, device: torch.device) -> torch.Tensor | None:
    idx = plan.index_q if which == "q" else plan.index_kv
    if idx is None:
        return None
    return plan.cached(("triton_index", which, device), lambda: idx.to(device))


# Host side. Plain integer helpers rather than ``triton.cdiv`` / ``triton.next_power_of_2``, which are
# constexpr functions costing microseconds per call on the host; per-plan launch lists are cached, since a
# lone attention call is otherwise bound by its host time (docs/PERFORMANCE_attention.md, session 7).
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _meta(q: torch.Tensor) -> dict:
    d = q.shape[-1]
    return {"BLOCK_D": max(16, 1 << (d - 1).bit_length()), "IEEE": q.dtype == torch.float32}


_SMS: dict = {}


def _sm_count(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SMS:
        _SMS[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SMS[key]


def _head_groups(H: int, n_seqs: int, sms: int | None) -> tuple[int, int]:
    """(heads per window program, number of head groups) for a launch over ``n_seqs`` sequences on a
    device of ``sms`` SMs (None: the interpreter, where "auto" means all heads)."""
    heads = WINDOW_CONFIG["heads"]
    if heads == "auto":
        groups = 1 if sms is None else min(H, _cdiv(AUTO_PROGRAMS_PER_SM * sms, max(1, n_seqs)))
        hpp = _cdiv(H, groups)
    else:
        hpp = int(heads) or H
    hpp = max(1, min(hpp, H))
    return hpp, _cdiv(H, hpp)


def _win_launches(rt: _Routing, H: int, dev: torch.device,
                  buckets: tuple[WindowBucket, ...]) -> list[tuple[WindowBucket, torch.Tensor, int, int, int]]:
    """Window-path launches of a plan routed over ``buckets``: (bucket, sequence ids, their count,
    heads per program, head groups), largest bucket first; cached on the routing."""
    key = ("win", H, WINDOW_CONFIG["heads"], buckets)
    if key not in rt._tables:
        sms = _sm_count(dev)
        rt._tables[key] = [(buckets[bi], seqs, seqs.numel(), *_head_groups(H, seqs.numel(), sms))
                           for bi, seqs in rt.win]
    return rt._tables[key]


# Shared memory of the window kernels grows with a tile row's bytes (element size x BLOCK_D). The
# buckets are tuned for 2-byte heads of up to 64 (128 bytes). Wider rows (float32; 2-byte heads of
# 65-128, e.g. the XL flow models' 80, whose 128-bucket backward with 2 stages asked for 288 KB of
# the 227 KB an H100 or H200 SM has) run unpipelined; rows over 256 bytes (float32 heads over 64,
# 2-byte heads over 128) keep only the buckets up to 64 (longer windows go to the long path).
_PIPELINED_ROW_BYTES, _BUCKET128_ROW_BYTES = 128, 256


def _row_bytes(q: torch.Tensor) -> int:
    return q.element_size() * _meta(q)["BLOCK_D"]


def _buckets_for(q: torch.Tensor) -> tuple[WindowBucket, ...]:
    """The configured window buckets that fit inputs like ``q`` (see ``_BUCKET128_ROW_BYTES``)."""
    buckets = _window_buckets()
    if _row_bytes(q) > _BUCKET128_ROW_BYTES:
        buckets = tuple(b for b in buckets if b.block <= 64)
    return buckets


def _stages_for(b: WindowBucket, q: torch.Tensor) -> int:
    """The bucket's pipeline depth for tile rows of up to 128 bytes (2-byte heads up to 64); 1 for wider
    rows (float32, the tests' dtype, or wider heads), whose tiles would pass the shared memory at 128
    with 2 stages."""
    return b.stages if _row_bytes(q) <= _PIPELINED_ROW_BYTES else 1


def _split_for(b: WindowBucket, q: torch.Tensor) -> bool:
    """Whether the bucket's forward runs its query chunks as separate programs for inputs like ``q``:
    as configured, except float32 on the GPU, which keeps the chunk loop (measured only for 2-byte
    inputs; the interpreter runs float32 split programs, which checks their indexing on the CPU)."""
    return bool(b.fwd_split) and b.fwd_m < b.block and (q.element_size() <= 2 or q.device.type != "cuda")


def _delta_from_p() -> bool:
    """Whether the one-tile backward kernels take delta = rowsum(dO * O) as rowsum(P * dP) instead of
    reading O (``WINDOW_CONFIG["delta_from_p"]``, default on)."""
    return bool(WINDOW_CONFIG.get("delta_from_p", True))


def _strides(*ts: torch.Tensor) -> list[int]:
    """Row and head strides of each ``[T, H, d]`` tensor."""
    return [s for t in ts for s in (t.stride(0), t.stride(1))]


def _forward(q, k, v, plan: VarlenPlan, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Output ``[T_q, H, d]`` and log2-domain LSE ``[T_q, H]`` (float32)."""
    T_q, H, d = q.shape
    dev = q.device
    cu_q, cu_kv = plan.device_tensors(dev)
    iq, ik = _index(plan, "q", dev), _index(plan, "kv", dev)
    idx_q = iq if iq is not None else cu_q  # unread placeholder pointer without a gather
    idx_k = ik if ik is not None else cu_kv
    o = torch.empty(T_q, H, d, dtype=q.dtype, device=dev)
    lse = torch.empty(T_q, H, dtype=torch.float32, device=dev)
    buckets = _buckets_for(q)
    rt = _routing(plan, dev, buckets)
    meta = _meta(q)
    common = dict(GATHER_Q=iq is not None, GATHER_K=ik is not None, **meta)
    if rt.win:
        for b, seqs, n_seqs, hpp, groups in _win_launches(rt, H, dev, buckets):
            split = _split_for(b, q)
            _win_fwd_kernel[(n_seqs * (b.block // b.fwd_m if split else 1), groups)](
                q, k, v, o, lse, idx_q, idx_k, cu_q, cu_kv, seqs, *_strides(q, k, v, o),
                H, hpp, scale * _LOG2E, d, EVEN_D=meta["BLOCK_D"] == d, BLOCK_M=b.fwd_m, BLOCK_N=b.block,
                STAGES=_stages_for(b, q), SPLIT=split, num_warps=b.fwd_warps, **common,
            )
    for mid, keep, _ in rt.long_groups:
        bm, bn, warps = _long_blocks("fwd", q, mid)
        seq, start = rt.table("fwd", bm, keep)
        if seq.numel() > 0:
            _fwd_kernel[(seq.numel(), H)](
                q, k, v, o, lse, idx_q, idx_k, cu_q, cu_kv, seq, start, *_strides(q, k, v, o),
                H, scale * _LOG2E, d, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, **common,
            )
    return o, lse


def _backward(q, k, v, o, lse, do, plan: VarlenPlan, scale: float, dq, dk, dv) -> None:
    """Writes dq ``[T_q, H, d]``, dk and dv ``[T_kv, H, d]`` (any row/head strides) in place."""
    T_q, H, d = q.shape
    dev = q.device
    cu_q, cu_kv = plan.device_tensors(dev)
    iq, ik = _index(plan, "q", dev), _index(plan, "kv", dev)
    idx_q = iq if iq is not None else cu_q
    idx_k = ik if ik is not None else cu_kv
    buckets = _buckets_for(q)
    rt = _routing(plan, dev, buckets)
    meta = _meta(q)
    common = dict(GATHER_Q=iq is not None, GATHER_K=ik is not None, **meta)
    if rt.win:
        for b, seqs, n_seqs, hpp, groups in _win_launches(rt, H, dev, buckets):
            _win_bwd_kernel[(n_seqs, groups)](
                q, k, v, o, do, lse, dq, dk, dv, idx_q, idx_k, cu_q, cu_kv, seqs,
                *_strides(q, k, v, o, do, dq, dk, dv),
                H, hpp, scale * _LOG2E, scale, d, EVEN_D=meta["BLOCK_D"] == d, BLOCK_M=b.bwd_m, BLOCK_N=b.block,
                STAGES=_stages_for(b, q), DELTA_FROM_P=_delta_from_p(),
                num_warps=b.bwd_warps, **common,
            )
    if rt.fused.numel() > 0:
        fused, _, fused_warps = BLOCK_CONFIG["bwd_fused"]
        _bwd_fused_kernel[(rt.fused.numel(), H)](
            q, k, v, o, do, lse, dq, dk, dv, idx_q, idx_k, cu_q, cu_kv, rt.fused,
            *_strides(q, k, v, o, do, dq, dk, dv),
            H, scale * _LOG2E, scale, d, BLOCK=fused, DELTA_FROM_P=_delta_from_p(), num_warps=fused_warps,
            **common,
        )
    if rt.n_long == 0:
        return
    delta = torch.empty(T_q, H, dtype=torch.float32, device=dev)  # rowsum(dO * O), long sequences' rows
    rows = rt.delta_rows()
    n_flat = (T_q if rows is None else rows.numel()) * H
    block_d = meta["BLOCK_D"]
    block_r = max(1, 4096 // block_d)
    if n_flat > 0:
        _delta_kernel[(_cdiv(n_flat, block_r),)](
            o, do, delta, rows if rows is not None else cu_q, n_flat, H, *_strides(o, do), d,
            GATHER=rows is not None, BLOCK_R=block_r, BLOCK_D=block_d,
        )
    for mid, _, keep in rt.long_groups:
        bm, bn, warps = _long_blocks("bwd_kv", q, mid)
        seq, start = rt.table("kv", bn, keep)
        if seq.numel() > 0:
            _bwd_kv_kernel[(seq.numel(), H)](
                q, k, v, do, lse, delta, dk, dv, idx_q, idx_k, cu_q, cu_kv, seq, start,
                *_strides(q, k, v, do, dk, dv),
                H, scale * _LOG2E, scale, d, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, **common,
            )
        bm, bn, warps = _long_blocks("bwd_q", q, mid)
        seq, start = rt.table("q", bm, keep)
        if seq.numel() > 0:
            _bwd_q_kernel[(seq.numel(), H)](
                q, k, v, do, lse, delta, dq, idx_q, idx_k, cu_q, cu_kv, seq, start,
                *_strides(q, k, v, do, dq),
                H, scale * _LOG2E, scale, d, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, **common,
            )


class _TritonVarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: VarlenPlan, scale: float):
        o, lse = _forward(q, k, v, plan, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.plan = plan
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        if do.stride(-1) != 1:
            do = do.contiguous()
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        _backward(q, k, v, o, lse, do, ctx.plan, ctx.scale, dq, dk, dv)
        return dq, dk, dv, None, None


class _TritonPackedAttention(torch.autograd.Function):
    """q, k, v as one ``[T, 3, H, d]`` input; the gradient is one ``[T, 3, H, d]`` buffer."""

    @staticmethod
    def forward(ctx, qkv, plan: VarlenPlan, scale: float):
        q, k, v = qkv.unbind(1)
        o, lse = _forward(q, k, v, plan, scale)
        ctx.save_for_backward(qkv, o, lse)
        ctx.plan = plan
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        qkv, o, lse = ctx.saved_tensors
        if do.stride(-1) != 1:
            do = do.contiguous()
        dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
        q, k, v = qkv.unbind(1)
        dq, dk, dv = dqkv.unbind(1)
        _backward(q, k, v, o, lse, do, ctx.plan, ctx.scale, dq, dk, dv)
        return dqkv, None, None


def _check_inputs(ts: dict, d: int) -> None:
    for name, t in ts.items():
        if t.stride(-1) != 1:
            raise ValueError(f"triton varlen attention: {name} needs a unit stride in its last dim")
    if d > 256:
        raise ValueError(f"triton varlen attention: head dim {d} > 256 is not supported")


def triton_varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: VarlenPlan, scale: float | None = None
) -> torch.Tensor:
    """q ``[T_q, H, d]``, k/v ``[T_kv, H, d]`` (any row/head strides, unit last stride) -> ``[T_q, H, d]``.

    Every row must belong to exactly one sequence of ``plan`` (true for plans built from full
    offsets and permutation indices), since outputs and gradients are written once per row.
    """
    _check_inputs({"q": q, "k": k, "v": v}, q.shape[-1])
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _TritonVarlenAttention.apply(q, k, v, plan, scale)


def triton_packed_attention(qkv: torch.Tensor, plan: VarlenPlan, scale: float | None = None) -> torch.Tensor:
    """Self-attention of ``qkv`` ``[T, 3, H, d]`` (q, k, v along dim 1; unit last stride) -> ``[T, H, d]``.

    Same maths as ``triton_varlen_attention(*qkv.unbind(1), plan)``; the backward writes dq, dk and dv
    into one ``[T, 3, H, d]`` gradient instead of three that autograd would stack.
    """
    if qkv.dim() != 4 or qkv.shape[1] != 3:
        raise ValueError(f"triton packed attention: expected qkv [T, 3, H, d], got {tuple(qkv.shape)}")
    _check_inputs({"qkv": qkv}, qkv.shape[-1])
    scale = 1.0 / math.sqrt(qkv.shape[-1]) if scale is None else float(scale)
    return _TritonPackedAttention.apply(qkv, plan, scale)
