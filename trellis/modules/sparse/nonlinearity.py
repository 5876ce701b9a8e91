"""Element-wise activations on the features of a ``SparseTensor``."""

from __future__ import annotations

from torch import nn

from trellis.modules.sparse.basic import SparseTensor

__all__ = ["SparseReLU", "SparseSiLU", "SparseGELU", "SparseTanh", "SparseSigmoid"]


def _check(x: object, who: str) -> SparseTensor:
    if not isinstance(x, SparseTensor):
        raise TypeError(f"{who} expects a SparseTensor, got {type(x).__name__}")
    return x


class SparseReLU(nn.ReLU):
    def forward(self, input: SparseTensor) -> SparseTensor:
        return _check(input, "SparseReLU").replace(super().forward(input.feats))


class SparseSiLU(nn.SiLU):
    def forward(self, input: SparseTensor) -> SparseTensor:
        return _check(input, "SparseSiLU").replace(super().forward(input.feats))


class SparseGELU(nn.GELU):
    """GELU; ``approximate='tanh'`` is the variant of the transformer MLPs (reference README 2.3)."""

    def forward(self, input: SparseTensor) -> SparseTensor:
        return _check(input, "SparseGELU").replace(super().forward(input.feats))


class SparseTanh(nn.Tanh):
    def forward(self, input: SparseTensor) -> SparseTensor:
        return _check(input, "SparseTanh").replace(super().forward(input.feats))


class SparseSigmoid(nn.Sigmoid):
    def forward(self, input: SparseTensor) -> SparseTensor:
        return _check(input, "SparseSigmoid").replace(super().forward(input.feats))
