"""SLatEncoder: per-voxel DINOv2 features -> structured latent (reference README 3.4).

    feats [N, 1024] --trunk (12 swin blocks)--> LN (no affine, eps 1e-5) --out_layer--> [N, 16]
    mean = [:, :8], logvar = [:, 8:]; z = mean + exp(logvar / 2) * eps  (or mean)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trellis.models.elastic import SparseTransformerElasticMixin
from trellis.models.structured_latent_vae.base import SparseTransformerBase
from trellis.modules.sparse.basic import SparseTensor
from trellis.modules.sparse.linear import SparseLinear

__all__ = ["SLatEncoder", "ElasticSLatEncoder"]


class SLatEncoder(SparseTransformerBase):
    """Sparse transformer VAE encoder.

    Args:
        resolution: grid side of the input voxels (64); stored, does not affect the weights.
        in_channels: per-voxel feature width (1024 for DINOv2 ViT-L features).
        model_channels: C (768).
        latent_channels: latent width (8); ``out_layer`` gives ``2 * latent_channels`` (mean, logvar).
        num_blocks, num_heads, num_head_channels, mlp_ratio, attn_mode, window_size, pe_mode,
        use_fp16, use_checkpoint, qk_rms_norm: see ``SparseTransformerBase``.
    """

    def __init__(
        self,
        resolution: int,
        in_channels: int,
        model_channels: int,
        latent_channels: int,
        num_blocks: int,
        num_heads: int | None = None,
        num_head_channels: int = 64,
        mlp_ratio: float = 4,
        attn_mode: str = "swin",
        window_size: int = 8,
        pe_mode: str = "ape",
        use_fp16: bool = False,
        use_checkpoint: bool = False,
        qk_rms_norm: bool = False,
    ):
        super().__init__(
            in_channels=in_channels, model_channels=model_channels, num_blocks=num_blocks,
            num_heads=num_heads, num_head_channels=num_head_channels, mlp_ratio=mlp_ratio,
            attn_mode=attn_mode, window_size=window_size, pe_mode=pe_mode, use_fp16=use_fp16,
            use_checkpoint=use_checkpoint, qk_rms_norm=qk_rms_norm,
        )
        self.resolution = resolution
        self.latent_channels = latent_channels
        self.out_layer = SparseLinear(model_channels, 2 * latent_channels)
        self._finish_init()

    def forward(
        self, x: SparseTensor, sample_posterior: bool = True, return_raw: bool = False
    ) -> SparseTensor | tuple[SparseTensor, torch.Tensor, torch.Tensor]:
        """Encode.

        Args:
            x: SparseTensor ``[N, in_channels]`` on the ``resolution``^3 grid.
            sample_posterior: draw ``z = mean + exp(logvar / 2) * eps`` (else ``z = mean``).
            return_raw: also return ``mean`` and ``logvar`` as ``[N, latent_channels]`` tensors.

        Returns:
            ``z`` SparseTensor ``[N, latent_channels]`` (same coords), or ``(z, mean, logvar)``.
        """
        h = super().forward(x)  # validates x
        in_dtype = x.feats.dtype
        feats = F.layer_norm(h.feats.to(in_dtype), h.feats.shape[-1:], eps=1e-5)
        feats = self.out_layer(h.replace(feats.to(self.out_layer.weight.dtype))).feats  # [N, 2 * latent]
        mean, logvar = feats.chunk(2, dim=-1)
        if sample_posterior:
            z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        else:
            z = mean
        z = x.replace(z)
        if return_raw:
            return z, mean, logvar
        return z


class ElasticSLatEncoder(SparseTransformerElasticMixin, SLatEncoder):
    """``SLatEncoder`` with elastic activation checkpointing (training only; same weights)."""
