"""Dense multi-head attention (the dense DiT of the sparse-structure flow model)."""

from __future__ import annotations

import torch
from torch import nn

from trellis.modules.attention.norm import MultiHeadRMSNorm, rms_norm_qk
from trellis.modules.attention.rope import RotaryPositionEmbedder
from trellis.modules.attention.varlen import dense_attention

__all__ = ["MultiHeadAttention", "add_projections"]


def add_projections(module: nn.Module, type: str, channels: int, ctx_channels: int, num_heads: int,
                    qkv_bias: bool, qk_rms_norm: bool) -> None:
    """Registers the projections of a TRELLIS attention module, in state-dict order: self-attention
    ``to_qkv`` Linear(C, 3C); cross-attention ``to_q`` Linear(C, C) and ``to_kv`` Linear(C_ctx, 2C);
    then ``q_rms_norm`` / ``k_rms_norm`` (gamma [H, C/H]) when ``qk_rms_norm``; then ``to_out``
    Linear(C, C). Shared by the dense and the sparse attention modules."""
    head_dim = channels // num_heads
    if type == "self":
        module.to_qkv = nn.Linear(channels, channels * 3, bias=qkv_bias)
    else:
        module.to_q = nn.Linear(channels, channels, bias=qkv_bias)
        module.to_kv = nn.Linear(ctx_channels, channels * 2, bias=qkv_bias)
    if qk_rms_norm:
        module.q_rms_norm = MultiHeadRMSNorm(head_dim, num_heads)
        module.k_rms_norm = MultiHeadRMSNorm(head_dim, num_heads)
    module.to_out = nn.Linear(channels, channels)


class MultiHeadAttention(nn.Module):
    """Self- or cross-attention on dense token batches (reference README section 2.3).

    Args:
        channels: model width C.
        num_heads: H; head dim d = C / H.
        ctx_channels: width of the cross-attention context (default C).
        type: ``"self"`` or ``"cross"``.
        attn_mode: only ``"full"`` for dense tensors (windowed attention is sparse-only here).
        window_size, shift_window: accepted for config compatibility; must be None with ``"full"``.
        qkv_bias: bias of the q/k/v projections.
        use_rope: rotary embedding of q and k (positions passed to ``forward``; default token index).
        qk_rms_norm: per-head RMS norm of q and k after the head split.

    Keys: self: ``to_qkv`` Linear(C, 3C); cross: ``to_q`` Linear(C, C), ``to_kv`` Linear(C_ctx, 2C);
    ``to_out`` Linear(C, C); with qk_rms_norm ``q_rms_norm.gamma``, ``k_rms_norm.gamma`` ``[H, d]``.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int,
        ctx_channels: int | None = None,
        type: str = "self",  # noqa: A002 - name kept from the original configs
        attn_mode: str = "full",
        window_size: int | None = None,
        shift_window: int | tuple[int, ...] | None = None,
        qkv_bias: bool = True,
        use_rope: bool = False,
        qk_rms_norm: bool = False,
    ):
        super().__init__()
        if channels % num_heads != 0:
            raise ValueError(f"MultiHeadAttention: channels {channels} not divisible by num_heads {num_heads}")
        if type not in ("self", "cross"):
            raise ValueError(f"MultiHeadAttention: type must be 'self' or 'cross', got {type!r}")
        if attn_mode != "full":
            raise ValueError(
                f"MultiHeadAttention: attn_mode {attn_mode!r} is not supported for dense tensors; use 'full' "
                "(windowed attention exists for sparse tensors: SparseMultiHeadAttention)"
            )
        if window_size is not None or shift_window is not None:
            raise ValueError("MultiHeadAttention: window_size / shift_window need a windowed attn_mode")
        if type == "cross" and use_rope:
            raise ValueError("MultiHeadAttention: RoPE is only defined for self-attention")
        self.channels = channels
        self.num_heads = num_heads
        self.head_dim = channels // num_heads
        self.ctx_channels = ctx_channels if ctx_channels is not None else channels
        self._type = type
        self.attn_mode = attn_mode
        self.use_rope = use_rope
        self.qk_rms_norm = qk_rms_norm
        add_projections(self, type, channels, self.ctx_channels, num_heads, qkv_bias, qk_rms_norm)
        if use_rope:
            self.rope = RotaryPositionEmbedder(self.head_dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, indices: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x ``[B, L, C]``; context ``[B, L_ctx, C_ctx]`` (cross only); indices: RoPE positions.

        Returns ``[B, L, C]``.
        """
        if x.dim() != 3 or x.shape[-1] != self.channels:
            raise ValueError(f"MultiHeadAttention: expected x [B, L, {self.channels}], got {tuple(x.shape)}")
        B, L, C = x.shape
        H, d = self.num_heads, self.head_dim
        if self._type == "self":
            if context is not None:
                raise ValueError("MultiHeadAttention(type='self'): context must be None")
            qkv = self.to_qkv(x).view(B, L, 3, H, d)  # [B, L, 3C] -> [B, L, 3, H, d]
            q, k, v = qkv.unbind(dim=2)
        else:
            if context is None or context.dim() != 3 or context.shape[0] != B or context.shape[-1] != self.ctx_channels:
                raise ValueError(
                    f"MultiHeadAttention(type='cross'): expected context [{B}, L_ctx, {self.ctx_channels}], got "
                    f"{None if context is None else tuple(context.shape)}"
                )
            q = self.to_q(x).view(B, L, H, d)  # [B, L, C] -> [B, L, H, d]
            kv = self.to_kv(context).view(B, context.shape[1], 2, H, d)  # [B, Lc, 2C] -> [B, Lc, 2, H, d]
            k, v = kv.unbind(dim=2)
        if self.qk_rms_norm:
            q, k = rms_norm_qk(self.q_rms_norm, self.k_rms_norm, q, k)
        if self.use_rope:
            q, k = self.rope(q, k, indices)
        h = dense_attention(q, k, v)  # [B, L, H, d]
        return self.to_out(h.reshape(B, L, C))  # [B, L, H, d] -> [B, L, C]
