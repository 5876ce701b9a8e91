"""Multi-head RMS normalisation of queries and keys (``q_rms_norm`` / ``k_rms_norm``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trellis.modules import fused

__all__ = ["MultiHeadRMSNorm", "rms_norm_qk"]


class MultiHeadRMSNorm(nn.Module):
    """Per-head RMS norm: ``F.normalize(x, dim=-1) * gamma * sqrt(dim)``, computed in float32.

    ``F.normalize`` divides by ``max(||x||_2, 1e-12)``; multiplying by ``sqrt(dim)`` turns the L2
    normalisation into an RMS normalisation. The result is cast back to the input dtype.

    Args:
        dim: head dimension d (last dim of the input).
        heads: number of heads H.

    Keys: ``gamma`` ``[H, d]`` (float32; initialised to ones).

    Input ``[..., H, d]`` -> output of the same shape and dtype.

    With fused regions on (``fused_setting`` / ``TRELLIS_FUSED``, see ``trellis.modules.fused``) the
    same expression runs as one compiled region.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim <= 0 or heads <= 0:
            raise ValueError(f"MultiHeadRMSNorm: dim and heads must be positive, got dim={dim}, heads={heads}")
        self.dim = dim
        self.heads = heads
        self.scale = math.sqrt(dim)
        self.gamma = nn.Parameter(torch.ones(heads, dim))
        self.fused_setting: fused.FusedSetting | None = None  # None: follow TRELLIS_FUSED

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or tuple(x.shape[-2:]) != (self.heads, self.dim):
            raise ValueError(
                f"MultiHeadRMSNorm: expected input [..., {self.heads}, {self.dim}], got {tuple(x.shape)}"
            )
        kern = fused.fused_kernels(self)
        if kern is not None:
            return fused.rms_norm_heads(x, self.gamma, self.scale, kern)
        y = F.normalize(x.float(), dim=-1) * self.gamma.float() * self.scale
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}"


def rms_norm_qk(q_norm: MultiHeadRMSNorm, k_norm: MultiHeadRMSNorm, q: torch.Tensor,
                k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q_norm(q), k_norm(k))``; one fused region for both when their fused setting is the same."""
    kern = fused.fused_kernels(q_norm)
    if kern is not None and fused.fused_kernels(k_norm) is kern and q_norm.scale == k_norm.scale:
        return fused.rms_norm_qk(q, k, q_norm.gamma, k_norm.gamma, q_norm.scale, kern)
    return q_norm(q), k_norm(k)
