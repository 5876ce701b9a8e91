"""Sequence partitions of a SparseTensor for attention, cached in its spatial cache.

Each function returns a ``VarlenPlan`` (``trellis.modules.attention.varlen``) whose sequences are groups
of rows of the tensor, gathered through ``index_q`` (no permuted copy of the features). A partition
depends only on the coordinates, so it is computed once per coordinate set and reused by every
layer, forward and backward, through ``SparseTensor.register_spatial_cache``.
"""

from __future__ import annotations

import torch

from trellis.modules.attention.varlen import VarlenPlan
from trellis.modules.sparse.basic import SparseTensor
from trellis.modules.sparse.serialize import encode_seq

__all__ = ["full_plan", "cross_plan", "window_plan", "serialized_plan", "as_triple"]


def as_triple(v: int | tuple[int, ...] | list[int] | None, what: str, default: int = 0) -> tuple[int, int, int]:
    """An int or a 3-sequence of ints -> ``(vx, vy, vz)``."""
    if v is None:
        return (default,) * 3
    if isinstance(v, int):
        return (v,) * 3
    t = tuple(int(a) for a in v)
    if len(t) != 3:
        raise ValueError(f"{what}: expected an int or 3 ints, got {v!r}")
    return t  # type: ignore[return-value]


def _cu_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """``[S]`` counts -> ``[S+1]`` int32 offsets."""
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]).to(torch.int32)


def full_plan(x: SparseTensor) -> VarlenPlan:
    """One sequence per batch item (self-attention over each object's voxels)."""
    plan = x.get_spatial_cache("attn_full")
    if plan is None:
        plan = VarlenPlan(_cu_from_counts(x.batch_counts))
        x.register_spatial_cache("attn_full", plan)
    return plan


def cross_plan(x: SparseTensor, context: torch.Tensor | SparseTensor) -> VarlenPlan:
    """Queries: each batch item's voxels; keys: that item's context tokens.

    ``context`` is dense ``[B, L, C_ctx]`` (flattened to ``B * L`` rows by the caller) or a SparseTensor.
    """
    if isinstance(context, SparseTensor):
        if context.batch_size != x.batch_size:
            raise ValueError(f"cross-attention: context has batch size {context.batch_size}, x has {x.batch_size}")
        cu_q = _cu_from_counts(x.batch_counts)
        return VarlenPlan(cu_q, _cu_from_counts(context.batch_counts.to(cu_q.device)))
    B, L = context.shape[0], context.shape[1]
    if B != x.batch_size:
        raise ValueError(f"cross-attention: context has batch size {B}, x has {x.batch_size}")
    key = f"attn_cross_dense_{L}"
    plan = x.get_spatial_cache(key)
    if plan is None:  # built once per coordinate set and context length: every block reuses it
        cu_q = _cu_from_counts(x.batch_counts)
        cu_kv = (torch.arange(B + 1, device=cu_q.device) * L).to(torch.int32)
        plan = VarlenPlan(cu_q, cu_kv)
        x.register_spatial_cache(key, plan)
    return plan


def window_plan(x: SparseTensor, window_size: tuple[int, int, int], shift: tuple[int, int, int]) -> VarlenPlan:
    """Swin partition (reference README 2.8): window id ``(b, (x+s)//w, (y+s)//w, (z+s)//w)``.

    No cyclic roll and no mask: every non-empty window is one sequence of its active voxels; edge
    windows are partial. Windows are ordered by (batch, wx, wy, wz); rows inside a window keep their
    input order.
    """
    key = f"attn_swin_{window_size}_{shift}"
    plan = x.get_spatial_cache(key)
    if plan is not None:
        return plan
    if min(window_size) <= 0 or min(shift) < 0:
        raise ValueError(f"window attention: window_size {window_size} must be positive and shift {shift} >= 0")
    c = x.coords.long()
    w = torch.tensor(window_size, device=c.device)
    s = torch.tensor(shift, device=c.device)
    cell = (c[:, 1:] + s) // w  # [N, 3] window index per axis
    if c.shape[0] > 0:
        ext = (cell.max(0).values + 1).tolist()
    else:
        ext = [1, 1, 1]
    wid = ((c[:, 0] * ext[0] + cell[:, 0]) * ext[1] + cell[:, 1]) * ext[2] + cell[:, 2]  # [N]
    wid_sorted, perm = torch.sort(wid, stable=True)
    _, counts = torch.unique_consecutive(wid_sorted, return_counts=True)
    plan = VarlenPlan(_cu_from_counts(counts), index_q=perm)
    x.register_spatial_cache(key, plan)
    return plan


def serialized_plan(
    x: SparseTensor,
    window_size: int,
    mode: str = "z_order",
    shift_sequence: int = 0,
    shift_window: tuple[int, int, int] = (0, 0, 0),
) -> VarlenPlan:
    """Serialized windows: each item's voxels ordered along a space-filling curve, cut into chunks.

    ``mode`` is ``'z_order'`` or ``'hilbert'`` (``trellis.modules.sparse.serialize.encode_seq``), applied
    to ``(x, y, z) + shift_window``. An item of L voxels is cut into ``n = ceil(L / window_size)``
    balanced chunks of ``ceil(L / n)`` consecutive voxels; curve position p goes to chunk
    ``(p + shift_sequence) // ceil(L / n)`` (a shift makes the first chunk shorter).
    """
    key = f"attn_serial_{window_size}_{mode}_{shift_sequence}_{shift_window}"
    plan = x.get_spatial_cache(key)
    if plan is not None:
        return plan
    if window_size <= 0 or shift_sequence < 0 or min(shift_window) < 0:
        raise ValueError(
            f"serialized attention: window_size {window_size} must be positive, shift_sequence {shift_sequence} "
            f"and shift_window {shift_window} non-negative"
        )
    c = x.coords.long()
    xyz = c[:, 1:] + torch.tensor(shift_window, device=c.device)
    depth = max(1, int(xyz.max()).bit_length()) if c.shape[0] > 0 else 1
    code = encode_seq(torch.cat([c[:, :1], xyz], dim=1), mode=mode, depth=depth)  # batch in the high bits
    perm = torch.argsort(code, stable=True)
    counts = x.batch_counts  # [B]
    b = c[perm, 0]  # [N] batch of each sorted row (non-decreasing)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(c.shape[0], device=c.device) - starts[b]  # curve position inside the item
    n_chunks = (counts + window_size - 1) // window_size
    size = ((counts + n_chunks.clamp(min=1) - 1) // n_chunks.clamp(min=1)).clamp(min=1)  # [B]
    chunk = (pos + shift_sequence) // size[b]
    sid = b * (int(chunk.max()) + 1 if chunk.numel() else 1) + chunk  # non-decreasing along perm
    _, seq_counts = torch.unique_consecutive(sid, return_counts=True)
    plan = VarlenPlan(_cu_from_counts(seq_counts), index_q=perm)
    x.register_spatial_cache(key, plan)
    return plan
