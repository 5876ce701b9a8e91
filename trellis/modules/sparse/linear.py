"""``SparseLinear``: ``nn.Linear`` applied to the features of a ``SparseTensor``."""

from __future__ import annotations

from torch import nn

from trellis.modules.sparse.basic import SparseTensor

__all__ = ["SparseLinear"]


class SparseLinear(nn.Linear):
    """``y.feats = x.feats @ W.T + b`` with ``W`` ``(out, in)``; state-dict keys ``weight`` / ``bias``."""

    def forward(self, input: SparseTensor) -> SparseTensor:
        if not isinstance(input, SparseTensor):
            raise TypeError(f"SparseLinear expects a SparseTensor, got {type(input).__name__}")
        return input.replace(super().forward(input.feats))
