"""Normalisation layers that compute in float32 whatever the activation dtype.

Inside an fp16 torso (see ``trellis.modules.fp16``) the activations are float16 but the norm
parameters stay float32. Each layer here upcasts its input to float32, normalises, applies the
affine parameters (if any) and casts the result back to the input dtype. Their class names contain
"Norm", so ``trellis.modules.fp16.convert_params`` keeps their parameters in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LayerNorm32", "GroupNorm32", "ChannelLayerNorm32", "layer_norm32"]


def layer_norm32(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                 normalized_shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """LayerNorm (default: over the last dim) with statistics and affine in float32, cast back to
    ``x``'s dtype: ``LayerNorm32``'s maths as a function (the compiled block segments use it)."""
    w = weight.float() if weight is not None else None
    b = bias.float() if bias is not None else None
    return F.layer_norm(x.float(), normalized_shape or (x.shape[-1],), w, b, eps).to(x.dtype)


class LayerNorm32(nn.LayerNorm):
    """``nn.LayerNorm`` over the last dim, computed in float32; output has the input's dtype.

    Keys: ``weight``, ``bias`` ``[C]`` when ``elementwise_affine`` (float32).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm32(x, self.weight, self.bias, self.eps, tuple(self.normalized_shape))


class GroupNorm32(nn.GroupNorm):
    """``nn.GroupNorm`` over ``[B, C, ...]`` computed in float32; output has the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


class ChannelLayerNorm32(LayerNorm32):
    """LayerNorm over the channel dim (dim 1) of a dense ``[B, C, X, Y, Z]`` (or any ``[B, C, ...]``).

    Used by the SS VAE res-blocks. Keys ``weight``/``bias`` ``[C]``; eps default 1e-5.

    Args:
        channels: C, the size of dim 1.
        eps: added to the variance.
        elementwise_affine: learnable per-channel scale and shift.
    """

    def __init__(self, channels: int, eps: float = 1e-5, elementwise_affine: bool = True):
        super().__init__(channels, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.normalized_shape[0]:
            raise ValueError(
                f"ChannelLayerNorm32: expected [B, {self.normalized_shape[0]}, ...], got shape {tuple(x.shape)}"
            )
        h = x.movedim(1, -1)  # [B, C, X, Y, Z] -> [B, X, Y, Z, C]
        h = super().forward(h)
        return h.movedim(-1, 1)  # [B, X, Y, Z, C] -> [B, C, X, Y, Z]
