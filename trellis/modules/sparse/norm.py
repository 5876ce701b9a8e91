"""Normalisation layers for ``SparseTensor``.

* ``SparseLayerNorm``: ``nn.LayerNorm`` over the channels of each voxel (no batch statistics).
* ``SparseGroupNorm``: ``nn.GroupNorm`` statistics per batch item over all of that item's voxels and
  the channels of each group (reference README 2.2), computed with segment sums over the batch ids
  (``index_add_``), not a Python loop over the batch.
* ``*32`` variants compute in float32 and cast the result back to the input dtype (used inside
  fp16 torsos; their parameters stay float32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trellis.modules.sparse.basic import SparseTensor

__all__ = ["SparseLayerNorm", "SparseLayerNorm32", "SparseGroupNorm", "SparseGroupNorm32", "segment_group_norm"]


def _check(x: object, who: str) -> SparseTensor:
    if not isinstance(x, SparseTensor):
        raise TypeError(f"{who} expects a SparseTensor, got {type(x).__name__}")
    return x


def segment_group_norm(
    feats: torch.Tensor,
    batch_ids: torch.Tensor,
    batch_size: int,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """Group norm with statistics per (batch item, group).

    Args:
        feats: ``[N, C]``; ``C`` divisible by ``num_groups``.
        batch_ids: ``[N]`` int64 batch index of each row.
        weight, bias: ``[C]`` affine parameters or ``None``.

    Returns ``[N, C]`` in ``feats.dtype``. Statistics accumulate in float32 (biased variance, as
    ``nn.GroupNorm``).
    """
    N, C = feats.shape
    if C % num_groups != 0:
        raise ValueError(f"SparseGroupNorm: {C} channels not divisible by {num_groups} groups")
    G, D = num_groups, C // num_groups
    x = feats.reshape(N, G, D)  # [N, C] -> [N, G, D]
    xf = x.float()
    count = torch.bincount(batch_ids, minlength=batch_size).clamp_min(1).to(xf.dtype) * D  # [B]
    sums = xf.new_zeros(batch_size, G).index_add_(0, batch_ids, xf.sum(-1))  # [B, G]
    mean = sums / count[:, None]  # [B, G]
    centered = xf - mean[batch_ids][:, :, None]  # [N, G, D]
    sq = xf.new_zeros(batch_size, G).index_add_(0, batch_ids, centered.square().sum(-1))  # [B, G]
    rstd = torch.rsqrt(sq / count[:, None] + eps)  # [B, G]
    y = (centered * rstd[batch_ids][:, :, None]).reshape(N, C)  # [N, G, D] -> [N, C]
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(feats.dtype)


class SparseLayerNorm(nn.LayerNorm):
    """LayerNorm over the feature dims of each voxel (computes in the input dtype)."""

    def forward(self, input: SparseTensor) -> SparseTensor:
        return _check(input, type(self).__name__).replace(super().forward(input.feats))


class SparseLayerNorm32(SparseLayerNorm):
    """``SparseLayerNorm`` computed in float32 and cast back to the input dtype."""

    def forward(self, input: SparseTensor) -> SparseTensor:
        x = _check(input, type(self).__name__).feats
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        y = F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)
        return input.replace(y.to(x.dtype))


class SparseGroupNorm(nn.GroupNorm):
    """GroupNorm with statistics per batch item over all its voxels; feats ``[N, C]``."""

    def forward(self, input: SparseTensor) -> SparseTensor:
        x = _check(input, type(self).__name__)
        if x.feats.ndim != 2 or x.feats.shape[1] != self.num_channels:
            raise ValueError(
                f"{type(self).__name__}: expected feats [N, {self.num_channels}], got {list(x.feats.shape)}"
            )
        y = segment_group_norm(x.feats, x.batch_ids, x.batch_size, self.num_groups, self.weight, self.bias, self.eps)
        return x.replace(y)


class SparseGroupNorm32(SparseGroupNorm):
    """``SparseGroupNorm`` computed in float32 and cast back (statistics are always float32)."""
