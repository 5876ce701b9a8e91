"""Unmodulated sparse transformer block: the trunk block of the SLat VAE (reference README 3.4).

``x += Attn(LN1(x)); x += MLP(LN2(x))`` on the voxel features. LayerNorms are per voxel (over the
channels), without affine parameters by default, eps 1e-6. Keys: ``attn.*``, ``mlp.mlp.{0,2}.*``.
"""

from __future__ import annotations

from torch import nn

from trellis.modules.norm import LayerNorm32
from trellis.modules.sparse.attention import SparseMultiHeadAttention
from trellis.modules.sparse.basic import SparseTensor
from trellis.modules.transformer.blocks import FeedForwardNet, run_maybe_checkpointed

__all__ = ["SparseTransformerBlock"]


class SparseTransformerBlock(nn.Module):
    """Pre-norm sparse self-attention block.

    Args:
        channels: C.
        num_heads: attention heads.
        mlp_ratio: FFN hidden width / C.
        attn_mode: ``SparseMultiHeadAttention`` mode: "full", "swin" (windowed, the SLat VAE) or
            "serialized".
        window_size: window side for "swin".
        shift_window: window shift for "swin" (TRELLIS: ``window_size // 2`` on odd blocks, else 0).
        use_checkpoint: activation checkpointing of this block.
        use_rope: rotary embedding in the attention.
        qk_rms_norm: RMS norm of q and k.
        qkv_bias: bias in the qkv projection.
        ln_affine: learnable scale/shift in the LayerNorms.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        attn_mode: str = "full",
        window_size: int | None = None,
        shift_window: int | tuple[int, int, int] | None = None,
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
        self.attn = SparseMultiHeadAttention(
            channels, num_heads=num_heads, type="self", attn_mode=attn_mode, window_size=window_size,
            shift_window=shift_window, qkv_bias=qkv_bias, use_rope=use_rope, qk_rms_norm=qk_rms_norm,
        )
        self.mlp = FeedForwardNet(channels, mlp_ratio=mlp_ratio)

    def _forward(self, x: SparseTensor) -> SparseTensor:
        h = self.attn(x.replace(self.norm1(x.feats)))
        x = x.replace(x.feats + h.feats)
        return x.replace(x.feats + self.mlp(self.norm2(x.feats)))

    def forward(self, x: SparseTensor) -> SparseTensor:
        """``x`` SparseTensor ``[N, C]`` -> SparseTensor ``[N, C]`` (same coords)."""
        return run_maybe_checkpointed(self._forward, self.use_checkpoint, x)
