"""Variable-length attention as one unpadded ``F.scaled_dot_product_attention`` call per sequence.

For a few long sequences (full attention over the objects of a SLat batch) this lets PyTorch run its
fastest dense kernel on each sequence, on an H100/H200 cuDNN's: on 8 sequences of 2k-8k tokens, head
dim 64, 297 TFLOP/s forward + backward against 240 for the Triton varlen kernels and 224 for
FlashAttention-2 varlen (an H200, docs/PERFORMANCE_attention.md). For cross-attention to 1374 tokens
it was slower than Triton. No padding and no mask: sequence i is rows
``cu_seqlens[i]:cu_seqlens[i+1]``, viewed as ``[1, H, L_i, d]`` (the caller, ``varlen``, gathers
the rows into sequence order first when the plan has an index). One launch per sequence, so it is only worth it for long ones; ``backend.select_backend``
decides.

Gradients: slicing a tensor S times makes autograd build S full-size zero tensors for the input's
gradient. ``_Pieces`` hands out the per-sequence views instead and, in backward, copies the S pieces'
gradients into one buffer (for q/k/v packed as ``[T, 3, H, d]``, one ``[T, 3, H, d]`` gradient).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

__all__ = ["per_sequence_attention", "per_sequence_packed_attention"]


class _Pieces(torch.autograd.Function):
    """``x`` -> the views ``x[s:e]`` (``j`` None) or ``x[s:e, j]`` for each ``(s, e, j)`` of ``pieces``.

    Backward writes each piece's gradient into its place in one buffer shaped like ``x``; rows no
    piece covers get zeros.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, pieces: tuple, covers_all: bool):
        ctx.pieces, ctx.covers_all = pieces, covers_all
        ctx.shape, ctx.dtype = x.shape, x.dtype
        return tuple(x[s:e] if j is None else x[s:e, j] for s, e, j in pieces)

    @staticmethod
    def backward(ctx, *grads):
        make = torch.empty if ctx.covers_all else torch.zeros
        out = make(ctx.shape, dtype=ctx.dtype, device=grads[0].device)
        for (s, e, j), g in zip(ctx.pieces, grads):
            (out[s:e] if j is None else out[s:e, j]).copy_(g)
        return out, None, None


def _bounds(lens: list[int]) -> list[tuple[int, int]]:
    out, s = [], 0
    for n in lens:
        out.append((s, s + n))
        s += n
    return out


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(0).transpose(1, 2)  # [L, H, d] -> [1, H, L, d] (a view)


def _attend(qs, ks, vs, scale: float, T_q: int, like: torch.Tensor) -> torch.Tensor:
    """Per-sequence SDPA over lists of ``[L, H, d]`` views -> ``[T_q, H, d]``."""
    outs = [F.scaled_dot_product_attention(_heads_first(q), _heads_first(k), _heads_first(v), scale=scale)
            .squeeze(0).transpose(0, 1) for q, k, v in zip(qs, ks, vs)]  # [1, H, L, d] -> [L, H, d]
    if not outs:
        return like.new_zeros(T_q, *like.shape[1:])
    return torch.cat(outs)  # the non-empty query sequences cover all T_q rows, in order


MANY_SEQUENCES = 512
_warned_many = False


def _warn_if_many(num_seqs: int) -> None:
    """One warning per process when ``torch_seq`` is asked to make hundreds of calls (e.g. forced
    by ``SPARSE_ATTN_BACKEND`` onto swin windows, where it is hundreds of times slower)."""
    global _warned_many
    if num_seqs > MANY_SEQUENCES and not _warned_many:
        _warned_many = True
        warnings.warn(f"attention backend 'torch_seq' makes one SDPA call per sequence and got {num_seqs} "
                      "sequences; for windowed or serialized attention use 'triton' (or leave the backend "
                      "to 'auto')", stacklevel=3)


def per_sequence_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens_q: list[int], lens_kv: list[int],
                           scale: float) -> torch.Tensor:
    """One SDPA call per sequence: q ``[T_q, H, d]``, k/v ``[T_kv, H, d]`` with each sequence's rows
    contiguous and in order (``lens_q`` / ``lens_kv`` rows each) -> ``[T_q, H, d]``."""
    live = [i for i, n in enumerate(lens_q) if n > 0]
    _warn_if_many(len(live))
    if not live:
        return q.new_zeros(q.shape)
    bq, bk = _bounds(lens_q), _bounds(lens_kv)
    pq = tuple((*bq[i], None) for i in live)
    pk = tuple((*bk[i], None) for i in live)
    kv_all = sum(lens_kv[i] for i in live) == k.shape[0]
    qs = _Pieces.apply(q, pq, True)
    ks, vs = _Pieces.apply(k, pk, kv_all), _Pieces.apply(v, pk, kv_all)
    return _attend(qs, ks, vs, scale, q.shape[0], q)


def per_sequence_packed_attention(qkv: torch.Tensor, lens: list[int], scale: float) -> torch.Tensor:
    """Self-attention over ``qkv [T, 3, H, d]`` (rows in sequence order) with one SDPA call per
    sequence; the gradient of ``qkv`` is one buffer."""
    live = [b for b, n in zip(_bounds(lens), lens) if n > 0]
    S = len(live)
    _warn_if_many(S)
    if S == 0:
        return qkv.new_zeros(qkv[:, 0].shape)
    views = _Pieces.apply(qkv, tuple((s, e, j) for j in range(3) for s, e in live), True)
    return _attend(views[:S], views[S:2 * S], views[2 * S:], scale, qkv.shape[0], qkv[:, 0])
