"""Variable-length attention over packed sequences: the functional core of every attention layer.

Layout. ``q`` is ``[T_q, H, d]`` and ``k``, ``v`` are ``[T_kv, H, d]``: the rows of S sequences packed
together. Sequence i owns query rows ``cu_seqlens_q[i]:cu_seqlens_q[i+1]`` and key/value rows
``cu_seqlens_kv[i]:cu_seqlens_kv[i+1]``. Optionally the rows are *gathered*: with ``index_q`` given,
sequence i's queries are ``q[index_q[cu_seqlens_q[i]:cu_seqlens_q[i+1]]]`` (likewise ``index_kv``), and
the output row of a query is written back at that query's own row. Windowed sparse attention uses this
to attend within windows without permuting the tokens first.

Maths: per sequence, ``softmax(q k^T * scale) v`` with ``scale = 1/sqrt(d)`` by default; non-causal,
no dropout, no mask other than sequence separation.

Backends (``trellis.modules.attention.backend``): the pure-PyTorch path groups sequences into a few
length buckets, pads each bucket to one length and runs ``F.scaled_dot_product_attention`` with a
key-padding mask (no Python loop per sequence); others call fused varlen kernels.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F

from trellis.modules.attention.backend import select_backend
from trellis.modules.attention.per_sequence import per_sequence_attention, per_sequence_packed_attention

__all__ = ["VarlenPlan", "varlen_attention", "attention_with_plan", "packed_attention_with_plan", "dense_attention",
           "naive_varlen_attention"]

# Sequences longer than this run unpadded, one bucket per distinct length pair.
_EXACT_ABOVE = 1024
# Upper bound on attention-score elements (n * H * Lq * Lk) per SDPA call of the torch path.
_SCORE_BUDGET = 1 << 27


def _pad_len(n: int) -> int:
    """Bucket length: the next value of the ladder 16, 24, 32, 48, 64, 96, ... (ratio <= 1.5); exact above 1024."""
    if n > _EXACT_ABOVE:
        return n
    p = 16
    while p < n:
        p = p * 3 // 2 if (p & (p - 1)) == 0 else (p // 3) * 4  # 16 -> 24 -> 32 -> 48 -> 64 ...
    return p


def _check_cu(cu: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 1 or cu.dtype.is_floating_point:
        raise ValueError(f"{what}: expected a 1-D integer tensor [S+1], got {cu!r:.80}")
    return cu


class VarlenPlan:
    """The sequence structure of a variable-length attention call, with per-backend index caches.

    Build it once per coordinate set (windowed attention caches it in the SparseTensor) and pass it to
    ``attention_with_plan``. Construction reads the lengths to the host once.

    Args:
        cu_seqlens_q: ``[S+1]`` integer offsets of the query sequences (starting at 0).
        cu_seqlens_kv: ``[S+1]`` offsets of the key/value sequences; None = same as the queries.
        index_q: optional ``[T_q]`` row index (a permutation of the query rows), see the module doc.
        index_kv: optional ``[T_kv]`` row index of the key/value rows; None with ``cu_seqlens_kv``
            None means the same as ``index_q`` (self-attention).
    """

    def __init__(
        self,
        cu_seqlens_q: torch.Tensor,
        cu_seqlens_kv: torch.Tensor | None = None,
        index_q: torch.Tensor | None = None,
        index_kv: torch.Tensor | None = None,
    ):
        cu_q = _check_cu(cu_seqlens_q, "cu_seqlens_q")
        self.self_attention = cu_seqlens_kv is None and index_kv is None
        cu_kv = cu_q if cu_seqlens_kv is None else _check_cu(cu_seqlens_kv, "cu_seqlens_kv")
        if cu_kv.numel() != cu_q.numel():
            raise ValueError(
                f"cu_seqlens_q has {cu_q.numel() - 1} sequences but cu_seqlens_kv has {cu_kv.numel() - 1}"
            )
        if cu_seqlens_kv is None and index_kv is None:
            index_kv = index_q
        host_q = cu_q.detach().cpu().long()
        host_kv = host_q if cu_kv is cu_q else cu_kv.detach().cpu().long()
        self.lens_q = (host_q[1:] - host_q[:-1]).tolist()
        self.lens_kv = (host_kv[1:] - host_kv[:-1]).tolist()
        if int(host_q[0]) != 0 or int(host_kv[0]) != 0:
            raise ValueError("cu_seqlens must start at 0")
        if any(n < 0 for n in self.lens_q) or any(n < 0 for n in self.lens_kv):
            raise ValueError("cu_seqlens must be non-decreasing")
        for i, (a, b) in enumerate(zip(self.lens_q, self.lens_kv)):
            if a > 0 and b == 0:
                raise ValueError(f"sequence {i} has {a} queries but no keys: attention over nothing is undefined")
        self.num_q = int(host_q[-1])
        self.num_kv = int(host_kv[-1])
        self.max_q = max(self.lens_q, default=0)
        self.max_kv = max(self.lens_kv, default=0)
        self.num_seqs = len(self.lens_q)
        device = cu_q.device
        self.cu_q = cu_q.to(device=device, dtype=torch.int32)
        self.cu_kv = self.cu_q if cu_kv is cu_q else cu_kv.to(device=device, dtype=torch.int32)
        for idx, n, what in ((index_q, self.num_q, "index_q"), (index_kv, self.num_kv, "index_kv")):
            if idx is not None and (idx.dim() != 1 or idx.numel() != n):
                raise ValueError(f"{what}: expected a 1-D tensor of {n} row indices, got {tuple(idx.shape)}")
        self.index_q = None if index_q is None else index_q.long()
        self.index_kv = None if index_kv is None else index_kv.long()
        self._cache: dict[Any, Any] = {}

    def cached(self, key: Any, build) -> Any:
        """Per-plan memo for backend index tensors (keyed by backend and device)."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def device_tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cu_q, cu_kv) int32 on ``device``."""
        return self.cached(("cu", device), lambda: (self.cu_q.to(device), self.cu_kv.to(device)))

    def inverse_q(self, device: torch.device) -> torch.Tensor:
        """Inverse permutation of ``index_q``: ``out_packed[inverse_q]`` is in the input row order."""

        def build() -> torch.Tensor:
            idx = self.index_q.to(device)
            inv = torch.empty_like(idx)
            inv[idx] = torch.arange(idx.numel(), device=device)
            return inv

        return self.cached(("inverse_q", device), build)

    def __repr__(self) -> str:
        return (
            f"VarlenPlan(seqs={self.num_seqs}, T_q={self.num_q}, T_kv={self.num_kv}, max_q={self.max_q}, "
            f"max_kv={self.max_kv}, gathered={self.index_q is not None})"
        )


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: VarlenPlan) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"varlen attention expects q [T_q, H, d], k/v [T_kv, H, d]; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape or q.shape[1:] != k.shape[1:]:
        raise ValueError(f"varlen attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree")
    if q.shape[0] != plan.num_q or k.shape[0] != plan.num_kv:
        raise ValueError(
            f"varlen attention: q has {q.shape[0]} rows and k/v {k.shape[0]}, but cu_seqlens cover "
            f"{plan.num_q} and {plan.num_kv}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"varlen attention: dtypes differ: q {q.dtype}, k {k.dtype}, v {v.dtype}")


def _torch_buckets(plan: VarlenPlan, device: torch.device) -> tuple[list[dict], torch.Tensor]:
    """Index tensors of the bucketed, padded SDPA path (built once per plan and device).

    Returns (buckets, restore): each bucket holds ``rows_q [n, Lq]``, ``rows_kv [n, Lk]`` (row indices
    into q / k, padded with row 0), ``key_mask [n, 1, 1, Lk]`` or None, and ``sel [n_valid]`` (flat
    positions of the real queries in ``[n * Lq]``). ``restore`` reorders the concatenated real query
    outputs into the input row order.
    """
    lens_q = torch.tensor(plan.lens_q, dtype=torch.long)
    lens_kv = torch.tensor(plan.lens_kv, dtype=torch.long)
    nonempty = lens_q > 0
    pad_q = torch.tensor([_pad_len(n) for n in plan.lens_q], dtype=torch.long)
    pad_kv = torch.tensor([_pad_len(n) for n in plan.lens_kv], dtype=torch.long)
    keys = torch.stack([pad_q, pad_kv], dim=1)[nonempty]  # [S', 2]
    seq_ids = torch.nonzero(nonempty).flatten()
    cu_q = plan.cu_q.cpu().long()
    cu_kv = plan.cu_kv.cpu().long()
    index_q = None if plan.index_q is None else plan.index_q.to(device)
    index_kv = None if plan.index_kv is None else plan.index_kv.to(device)
    buckets: list[dict] = []
    covered: list[torch.Tensor] = []
    if keys.numel() > 0:
        uniq, which = torch.unique(keys, dim=0, return_inverse=True)
        for b in range(uniq.shape[0]):
            ids = seq_ids[which == b]
            lq_pad, lk_pad = int(uniq[b, 0]), int(uniq[b, 1])
            ar_q = torch.arange(lq_pad)
            ar_k = torch.arange(lk_pad)
            valid_q = ar_q[None, :] < lens_q[ids][:, None]  # [n, Lq]
            valid_k = ar_k[None, :] < lens_kv[ids][:, None]  # [n, Lk]
            rows_q = torch.where(valid_q, cu_q[ids][:, None] + ar_q[None, :], 0).to(device)
            rows_kv = torch.where(valid_k, cu_kv[ids][:, None] + ar_k[None, :], 0).to(device)
            if index_q is not None:
                rows_q = index_q[rows_q]
            if index_kv is not None:
                rows_kv = index_kv[rows_kv]
            sel = torch.nonzero(valid_q.flatten()).flatten().to(device)
            need_mask = bool((~valid_k).any())
            buckets.append({
                "rows_q": rows_q,
                "rows_kv": rows_kv,
                "key_mask": valid_k[:, None, None, :].to(device) if need_mask else None,
                "sel": sel,
            })
            covered.append(rows_q.flatten()[sel])
    if covered:
        restore = torch.argsort(torch.cat(covered))
    else:
        restore = torch.zeros(0, dtype=torch.long, device=device)
    return buckets, restore


def _attention_torch(q, k, v, plan: VarlenPlan, scale: float) -> torch.Tensor:
    """Pure-PyTorch varlen attention: padded SDPA per length bucket. Returns ``[T_q, H, d]``."""
    T_q, H, d = q.shape
    buckets, restore = plan.cached(("torch", q.device), lambda: _torch_buckets(plan, q.device))
    outs = []
    for bk in buckets:
        n, lq = bk["rows_q"].shape
        lk = bk["rows_kv"].shape[1]
        step = max(1, _SCORE_BUDGET // max(1, H * lq * lk))
        parts = []
        for s in range(0, n, step):
            rq, rk = bk["rows_q"][s : s + step], bk["rows_kv"][s : s + step]
            m = rq.shape[0]
            # index_select (backward: index_add) instead of advanced indexing, whose backward is a
            # sort-based index_put that is ~20x slower on CUDA
            fq, fk = rq.flatten(), rk.flatten()
            qb = q.index_select(0, fq).view(m, lq, H, d).transpose(1, 2)  # [m*Lq, H, d] -> [m, H, Lq, d]
            kb = k.index_select(0, fk).view(m, lk, H, d).transpose(1, 2)  # [m*Lk, H, d] -> [m, H, Lk, d]
            vb = v.index_select(0, fk).view(m, lk, H, d).transpose(1, 2)
            mask = None if bk["key_mask"] is None else bk["key_mask"][s : s + step]
            ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale)  # [m, H, Lq, d]
            parts.append(ob.transpose(1, 2).reshape(m * lq, H, d))  # [m, H, Lq, d] -> [m*Lq, H, d]
        ob = torch.cat(parts) if len(parts) > 1 else parts[0]
        outs.append(ob.index_select(0, bk["sel"]))
    if not outs:
        return q.new_zeros(T_q, H, d)
    return torch.cat(outs).index_select(0, restore)


def _gather(x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    return x if index is None else x.index_select(0, index.to(x.device))


def _restore(out: torch.Tensor, plan: VarlenPlan) -> torch.Tensor:
    """Outputs in sequence order -> the input row order (undoes the gather of ``index_q``)."""
    return out if plan.index_q is None else out.index_select(0, plan.inverse_q(out.device))


def _attention_fused(q, k, v, plan: VarlenPlan, scale: float, backend: str) -> torch.Tensor:
    """Backends that take packed contiguous sequences: gather, call the kernel, scatter back."""
    qg, kg, vg = _gather(q, plan.index_q), _gather(k, plan.index_kv), _gather(v, plan.index_kv)
    cu_q, cu_kv = plan.device_tensors(q.device)
    if backend == "torch_varlen":
        from torch.nn.attention.varlen import varlen_attn

        if "scale" in inspect.signature(varlen_attn).parameters:
            out = varlen_attn(qg, kg, vg, cu_q, cu_kv, plan.max_q, plan.max_kv, scale=scale)
        else:  # older torch: default scale only; fold ours into q
            qg = qg * (scale * math.sqrt(q.shape[-1]))
            out = varlen_attn(qg, kg, vg, cu_q, cu_kv, plan.max_q, plan.max_kv)
    elif backend == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        out = flash_attn_varlen_func(qg, kg, vg, cu_q, cu_kv, plan.max_q, plan.max_kv, softmax_scale=scale)
    elif backend == "torch_seq":
        out = per_sequence_attention(qg, kg, vg, plan.lens_q, plan.lens_kv, scale)
    elif backend == "xformers":
        from xformers.ops import fmha

        bias = plan.cached("xformers_bias", lambda: fmha.BlockDiagonalMask.from_seqlens(plan.lens_q, plan.lens_kv))
        out = fmha.memory_efficient_attention(qg[None], kg[None], vg[None], attn_bias=bias, scale=scale)[0]
    else:
        raise ValueError(f"unknown fused attention backend {backend!r}")
    return _restore(out, plan)


def attention_with_plan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: VarlenPlan,
    *,
    scale: float | None = None,
    backend: str | None = None,
    sparse: bool = True,
) -> torch.Tensor:
    """Varlen attention with a prepared ``VarlenPlan``.

    Args:
        q: ``[T_q, H, d]``; k, v: ``[T_kv, H, d]`` (views with a unit last stride are fine).
        plan: the sequence structure.
        scale: softmax scale; default ``1/sqrt(d)``.
        backend: force a backend; None reads ``SPARSE_ATTN_BACKEND`` / ``ATTN_BACKEND`` (``sparse``
            False reads only ``ATTN_BACKEND``).

    Returns ``[T_q, H, d]`` in the input row order, dtype of q.
    """
    _check_qkv(q, k, v, plan)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if backend is None:
        backend = select_backend(q.device, q.dtype, varlen=True, sparse=sparse, plan=plan)
    if backend == "torch":
        return _attention_torch(q, k, v, plan, scale)
    if backend == "triton":
        from trellis.modules.attention.triton_varlen import triton_varlen_attention

        return triton_varlen_attention(q, k, v, plan, scale)
    return _attention_fused(q, k, v, plan, scale, backend)



def packed_attention_with_plan(
    qkv: torch.Tensor,
    plan: VarlenPlan,
    *,
    scale: float | None = None,
    backend: str | None = None,
    sparse: bool = True,
) -> torch.Tensor:
    """``attention_with_plan(*qkv.unbind(1), plan)`` for q, k, v packed as ``qkv`` ``[T, 3, H, d]``.

    Same result and arguments. The ``triton`` backend then returns the gradient of ``qkv`` as one
    buffer its kernels write directly, where three views' gradients would be stacked by autograd (a
    copy); the other backends unbind and call ``attention_with_plan``.
    """
    if qkv.dim() != 4 or qkv.shape[1] != 3:
        raise ValueError(f"packed attention expects qkv [T, 3, H, d], got {tuple(qkv.shape)}")
    q, k, v = qkv.unbind(1)
    _check_qkv(q, k, v, plan)
    if backend is None:
        backend = select_backend(q.device, q.dtype, varlen=True, sparse=sparse, plan=plan)
    if backend == "triton" and qkv.stride(-1) == 1:
        from trellis.modules.attention.triton_varlen import triton_packed_attention

        return triton_packed_attention(qkv, plan, scale)
    if backend == "torch_seq":
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        return _restore(per_sequence_packed_attention(_gather(qkv, plan.index_q), plan.lens_q, scale), plan)
    return attention_with_plan(q, k, v, plan, scale=scale, backend=backend, sparse=sparse)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_kv: torch.Tensor,
    max_q: int | None = None,
    max_kv: int | None = None,
    *,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention of S packed sequences (the flash-attn ``varlen`` calling convention).

    Args:
        q: ``[T_q, H, d]``; k, v: ``[T_kv, H, d]``.
        cu_seqlens_q, cu_seqlens_kv: ``[S+1]`` integer offsets, starting at 0 and ending at T.
        max_q, max_kv: longest sequences (checked when given; computed otherwise).
        scale: softmax scale, default ``1/sqrt(d)``.
        backend: force a backend (see ``trellis.modules.attention.backend``); None reads the env vars.

    Returns ``[T_q, H, d]``. Builds a ``VarlenPlan`` per call (one host sync); reuse a plan with
    ``attention_with_plan`` when the sequence structure repeats.
    """
    plan = VarlenPlan(cu_seqlens_q, cu_seqlens_kv)
    if max_q is not None and int(max_q) < plan.max_q:
        raise ValueError(f"max_q={max_q} but the longest query sequence has {plan.max_q} rows")
    if max_kv is not None and int(max_kv) < plan.max_kv:
        raise ValueError(f"max_kv={max_kv} but the longest key sequence has {plan.max_kv} rows")
    return attention_with_plan(q, k, v, plan, scale=scale, backend=backend)


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None, backend: str | None = None
) -> torch.Tensor:
    """Batched attention on ``[B, L, H, d]`` queries and ``[B, L_kv, H, d]`` keys/values -> ``[B, L, H, d]``.

    ``torch`` (default) is ``F.scaled_dot_product_attention``, which picks flash / cuDNN / efficient
    kernels itself; ``flash_attn`` and ``xformers`` call those packages (``ATTN_BACKEND``).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] \
            or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"dense attention expects q [B, L, H, d], k/v [B, L_kv, H, d]; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if backend is None:
        backend = select_backend(q.device, q.dtype, varlen=False, sparse=False)
    if backend in ("torch", "torch_varlen", "triton", "torch_seq"):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
        return out.transpose(1, 2)  # [B, H, L, d] -> [B, L, H, d]
    if backend == "flash_attn":
        from flash_attn import flash_attn_func

        return flash_attn_func(q, k, v, softmax_scale=scale)
    if backend == "xformers":
        from xformers.ops import memory_efficient_attention

        return memory_efficient_attention(q, k, v, scale=scale)
    raise ValueError(f"unknown attention backend {backend!r}")


def naive_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_kv: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Test oracle: explicit per-sequence ``softmax(q k^T * scale) v`` in the input dtype (use float64).

    A Python loop over sequences; only for tests and checks. Shapes as ``varlen_attention``.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = torch.zeros_like(q)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_kv.tolist()
    for i in range(len(cq) - 1):
        if cq[i + 1] == cq[i]:
            continue
        qs = q[cq[i] : cq[i + 1]].transpose(0, 1)  # [Lq, H, d] -> [H, Lq, d]
        ks = k[ck[i] : ck[i + 1]].transpose(0, 1)  # [Lk, H, d] -> [H, Lk, d]
        vs = v[ck[i] : ck[i + 1]].transpose(0, 1)
        p = torch.softmax(qs @ ks.transpose(1, 2) * scale, dim=-1)  # [H, Lq, Lk]
        out[cq[i] : cq[i + 1]] = (p @ vs).transpose(0, 1)
    return out
