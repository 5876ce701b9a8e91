"""Unmodulated dense transformer blocks (pre-norm) and the shared feed-forward net.

Every block carries a ``use_checkpoint`` attribute. When it is True and autograd is recording, the
block's forward runs under non-reentrant activation checkpointing
(``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``). The elastic memory mixin
(``trellis.models.elastic``) toggles this attribute per block.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from trellis.modules.attention import MultiHeadAttention
from trellis.modules.norm import LayerNorm32

__all__ = ["FeedForwardNet", "TransformerBlock", "TransformerCrossBlock", "run_maybe_checkpointed"]


def run_maybe_checkpointed(fn: Callable[..., Any], enabled: bool, *args: Any) -> Any:
    """Calls ``fn(*args)``, under non-reentrant activation checkpointing when ``enabled`` and grad is on."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class FeedForwardNet(nn.Module):
    """Linear(C -> int(C * mlp_ratio)), GELU (tanh approximation), Linear(back to C).

    Keys: ``mlp.0.{weight,bias}``, ``mlp.2.{weight,bias}``. Acts on the last dim, so it serves both
    dense ``[B, L, C]`` tokens and sparse ``[N, C]`` features.
    """

    def __init__(self, channels: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.GELU(approximate="tanh"),
            nn.Linear(hidden, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class TransformerBlock(nn.Module):
    """Pre-norm self-attention block: ``x += Attn(LN1(x)); x += MLP(LN2(x))``.

    Args:
        channels: C.
        num_heads: attention heads (C must divide evenly).
        mlp_ratio: FFN hidden width / C.
        attn_mode: passed to ``MultiHeadAttention`` ("full").
        use_checkpoint: activation checkpointing of this block.
        use_rope: rotary position embedding in the attention (needs positions at call time).
        qk_rms_norm: multi-head RMS norm of q and k.
        qkv_bias: bias in the qkv projection.
        ln_affine: learnable scale/shift in the two LayerNorms (eps 1e-6).
    """

    def __init__(
        self,
        channels: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        attn_mode: str = "full",
        use_checkpoint: bool = False,
        use_rope: bool = False,
        qk_rms_norm: bool = False,
        qkv_bias: bool = True,
        ln_affine: bool = False,
    ):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.norm1 = LayerNorm32(channels, elementwise_affine=ln_affine, eps=1e-6)
        self.norm2 = LayerNorm32(channels, elementwise_affine=ln_affine, eps=1e-6)
        self.attn = MultiHeadAttention(
            channels, num_heads=num_heads, type="self", attn_mode=attn_mode,
            qkv_bias=qkv_bias, use_rope=use_rope, qk_rms_norm=qk_rms_norm,
        )
        self.mlp = FeedForwardNet(channels, mlp_ratio=mlp_ratio)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, L, C]`` -> ``[B, L, C]``."""
        return run_maybe_checkpointed(self._forward, self.use_checkpoint, x)


class TransformerCrossBlock(nn.Module):
    """Pre-norm self-attention, cross-attention and FFN block.

    ``x += SelfAttn(LN1(x)); x += CrossAttn(LN2(x), context); x += MLP(LN3(x))``.
    ``norm2`` (before the cross-attention) is always affine; ``norm1``/``norm3`` follow ``ln_affine``.

    Args: as :class:`TransformerBlock`, plus ``ctx_channels`` (width of the context) and
    ``qk_rms_norm_cross`` (RMS norm of q and k in the cross-attention).
    """

    def __init__(
        self,
        channels: int,
        ctx_channels: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        attn_mode: str = "full",
        use_checkpoint: bool = False,
        use_rope: bool = False,
        qk_rms_norm: bool = False,
        qk_rms_norm_cross: bool = False,
        qkv_bias: bool = True,
        ln_affine: bool = False,
    ):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.norm1 = LayerNorm32(channels, elementwise_affine=ln_affine, eps=1e-6)
        self.norm2 = LayerNorm32(channels, elementwise_affine=True, eps=1e-6)
        self.norm3 = LayerNorm32(channels, elementwise_affine=ln_affine, eps=1e-6)
        self.self_attn = MultiHeadAttention(
            channels, num_heads=num_heads, type="self", attn_mode=attn_mode,
            qkv_bias=qkv_bias, use_rope=use_rope, qk_rms_norm=qk_rms_norm,
        )
        self.cross_attn = MultiHeadAttention(
            channels, ctx_channels=ctx_channels, num_heads=num_heads, type="cross", attn_mode="full",
            qkv_bias=qkv_bias, qk_rms_norm=qk_rms_norm_cross,
        )
        self.mlp = FeedForwardNet(channels, mlp_ratio=mlp_ratio)

    def _forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), context)
        return x + self.mlp(self.norm3(x))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``x [B, L, C]``, ``context [B, L_ctx, ctx_channels]`` -> ``[B, L, C]``."""
        return run_maybe_checkpointed(self._forward, self.use_checkpoint, x, context)
