"""``SparseMultiHeadAttention``: self-attention (full / swin / serialized) and cross-attention on voxels."""

from __future__ import annotations

import torch
from torch import nn

from trellis.modules.attention.modules import add_projections
from trellis.modules.attention.norm import rms_norm_qk
from trellis.modules.attention.rope import RotaryPositionEmbedder
from trellis.modules.attention.varlen import attention_with_plan, packed_attention_with_plan
from trellis.modules.sparse.attention.partition import (
    as_triple,
    cross_plan,
    full_plan,
    serialized_plan,
    window_plan,
)
from trellis.modules.sparse.basic import SparseTensor

__all__ = ["SparseMultiHeadAttention"]

_MODES = ("full", "swin", "windowed", "serialized")


class SparseMultiHeadAttention(nn.Module):
    """Multi-head attention over the voxels of a SparseTensor (reference README 2.3, 2.7, 2.8).

    Args:
        channels: model width C.
        num_heads: H; head dim d = C / H.
        ctx_channels: width of the cross-attention context (default C).
        type: ``"self"`` or ``"cross"`` (cross-attention is per batch item, always full).
        attn_mode: ``"full"`` (each batch item one sequence), ``"swin"`` / ``"windowed"`` (each
            non-empty window of ``window_size``^3 voxels, offset by ``shift_window``, one sequence) or
            ``"serialized"`` (chunks of ``window_size`` voxels along a z-order / Hilbert curve).
        window_size: window edge (int or 3 ints) for swin; chunk length (int) for serialized; ignored
            (as in the original) with ``"full"``, as is ``shift_window``.
        shift_window: swin: int or 3 ints added to the coords before the window division (block i of
            the SLat VAE passes ``(window_size // 2) * (i % 2)``); serialized: added before encoding.
        serialize_mode: ``"z_order"`` (default) or ``"hilbert"``, for ``"serialized"``.
        shift_sequence: serialized only: curve offset of the chunk boundaries.
        qkv_bias: bias of the q/k/v projections.
        use_rope: 3-axis rotary embedding of q and k at the voxel coords (self only).
        qk_rms_norm: per-head RMS norm of q and k.

    Keys: self: ``to_qkv`` Linear(C, 3C); cross: ``to_q`` Linear(C, C), ``to_kv`` Linear(C_ctx, 2C);
    ``to_out`` Linear(C, C); ``q_rms_norm.gamma``, ``k_rms_norm.gamma`` ``[H, d]`` with qk_rms_norm.

    The attention backend is chosen per call (``SPARSE_ATTN_BACKEND``, see
    ``trellis.modules.attention.backend``); window partitions are cached in the SparseTensor.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int,
        ctx_channels: int | None = None,
        type: str = "self",  # noqa: A002 - name kept from the original configs
        attn_mode: str = "full",
        window_size: int | tuple[int, int, int] | None = None,
        shift_window: int | tuple[int, int, int] | None = None,
        serialize_mode: str | None = None,
        shift_sequence: int | None = None,
        qkv_bias: bool = True,
        use_rope: bool = False,
        qk_rms_norm: bool = False,
    ):
        super().__init__()
        if channels % num_heads != 0:
            raise ValueError(f"SparseMultiHeadAttention: channels {channels} not divisible by num_heads {num_heads}")
        if type not in ("self", "cross"):
            raise ValueError(f"SparseMultiHeadAttention: type must be 'self' or 'cross', got {type!r}")
        if attn_mode not in _MODES:
            raise ValueError(f"SparseMultiHeadAttention: attn_mode must be one of {_MODES}, got {attn_mode!r}")
        if type == "cross" and attn_mode != "full":
            raise ValueError("SparseMultiHeadAttention: cross-attention only supports attn_mode='full'")
        if type == "cross" and use_rope:
            raise ValueError("SparseMultiHeadAttention: RoPE is only defined for self-attention")
        if attn_mode in ("swin", "windowed", "serialized") and window_size is None:
            raise ValueError(f"SparseMultiHeadAttention: attn_mode={attn_mode!r} needs window_size")
        if attn_mode == "serialized":
            if not isinstance(window_size, int):
                raise ValueError(f"SparseMultiHeadAttention: serialized window_size must be an int, got {window_size!r}")
            if (serialize_mode or "z_order") not in ("z_order", "hilbert"):
                raise ValueError(f"SparseMultiHeadAttention: serialize_mode must be 'z_order' or 'hilbert', "
                                 f"got {serialize_mode!r}")
        elif serialize_mode is not None or shift_sequence is not None:
            raise ValueError("SparseMultiHeadAttention: serialize_mode / shift_sequence need attn_mode='serialized'")
        self.channels = channels
        self.num_heads = num_heads
        self.head_dim = channels // num_heads
        self.ctx_channels = ctx_channels if ctx_channels is not None else channels
        self._type = type
        self.attn_mode = attn_mode
        self.window_size = window_size
        self.shift_window = shift_window
        self.serialize_mode = serialize_mode or "z_order"
        self.shift_sequence = shift_sequence or 0
        self.use_rope = use_rope
        self.qk_rms_norm = qk_rms_norm
        if attn_mode in ("swin", "windowed"):
            self._window = as_triple(window_size, "window_size")
            self._shift = as_triple(shift_window, "shift_window")
        add_projections(self, type, channels, self.ctx_channels, num_heads, qkv_bias, qk_rms_norm)
        if use_rope:
            self.rope = RotaryPositionEmbedder(self.head_dim, in_channels=3)

    def self_plan(self, x: SparseTensor):
        """The self-attention partition of ``x`` for this module's mode (cached in ``x``)."""
        if self.attn_mode == "full":
            return full_plan(x)
        if self.attn_mode in ("swin", "windowed"):
            return window_plan(x, self._window, self._shift)
        return serialized_plan(
            x, int(self.window_size), self.serialize_mode, self.shift_sequence,
            as_triple(self.shift_window, "shift_window"),
        )

    def context_rows(self, context: torch.Tensor | SparseTensor | None) -> torch.Tensor:
        """Cross-attention context as rows ``[M, C_ctx]``: a SparseTensor's feats, or a dense
        ``[B, L, C_ctx]`` flattened to ``B * L`` rows (checked)."""
        if context is None:
            raise ValueError("SparseMultiHeadAttention(type='cross'): context is required")
        if isinstance(context, SparseTensor):
            ctx = context.feats
        else:
            if context.dim() != 3:
                raise ValueError(
                    f"SparseMultiHeadAttention(type='cross'): dense context must be [B, L, {self.ctx_channels}], "
                    f"got {tuple(context.shape)}"
                )
            ctx = context.reshape(-1, context.shape[-1])  # [B, L, C_ctx] -> [B*L, C_ctx]
        if ctx.shape[-1] != self.ctx_channels:
            raise ValueError(
                f"SparseMultiHeadAttention(type='cross'): context has {ctx.shape[-1]} channels, "
                f"expected {self.ctx_channels}"
            )
        return ctx

    def forward(self, x: SparseTensor, context: torch.Tensor | SparseTensor | None = None) -> SparseTensor:
        """x SparseTensor ``[N, C]``; context (cross only) dense ``[B, L, C_ctx]`` or SparseTensor ``[M, C_ctx]``.

        Returns a SparseTensor ``[N, C]`` with x's coords, row order and spatial cache.
        """
        if not isinstance(x, SparseTensor):
            raise TypeError(f"SparseMultiHeadAttention: x must be a SparseTensor, got {type(x).__name__}")
        feats = x.feats
        if feats.dim() != 2 or feats.shape[1] != self.channels:
            raise ValueError(
                f"SparseMultiHeadAttention: expected feats [N, {self.channels}], got {tuple(feats.shape)}"
            )
        N, C = feats.shape
        H, d = self.num_heads, self.head_dim
        if self._type == "self":
            if context is not None:
                raise ValueError("SparseMultiHeadAttention(type='self'): context must be None")
            qkv = self.to_qkv(feats).view(N, 3, H, d)  # [N, 3C] -> [N, 3, H, d]
            plan = self.self_plan(x)
            if not (self.qk_rms_norm or self.use_rope):  # q, k, v stay one tensor: one gradient buffer
                h = packed_attention_with_plan(qkv, plan)  # [N, H, d]
                return x.replace(self.to_out(h.reshape(N, C)))  # [N, H, d] -> [N, C]
            q, k, v = qkv.unbind(dim=1)
        else:
            q = self.to_q(feats).view(N, H, d)  # [N, C] -> [N, H, d]
            ctx = self.context_rows(context)
            kv = self.to_kv(ctx).view(ctx.shape[0], 2, H, d)  # [M, 2C] -> [M, 2, H, d]
            k, v = kv.unbind(dim=1)
            plan = cross_plan(x, context)
        if self.qk_rms_norm:
            q, k = rms_norm_qk(self.q_rms_norm, self.k_rms_norm, q, k)
        if self.use_rope:
            ang = self.rope.angles(x.coords[:, 1:])  # [N, d/2]
            q, k = self.rope.rotate(q, ang), self.rope.rotate(k, ang)
        h = attention_with_plan(q, k, v, plan)  # [N, H, d]
        return x.replace(self.to_out(h.reshape(N, C)))  # [N, H, d] -> [N, C]
