"""Sparse transformer blocks over a ``SparseTensor`` (features ``[N, C]``)."""

from trellis.modules.sparse.transformer.blocks import SparseTransformerBlock
from trellis.modules.sparse.transformer.modulated import ModulatedSparseTransformerCrossBlock

__all__ = ["SparseTransformerBlock", "ModulatedSparseTransformerCrossBlock"]
