"""Sparse transformer blocks over a ``SparseTensor`` (features ``[N, C]``)."""

from trellis.modules.sparse.transformer.blocks import SparseTransformerBlock
from trellis.modules.sparse.transformer.modulated import ModulatedSparseTransformerCrossBlock, per_batch_rows

__all__ = ["SparseTransformerBlock", "ModulatedSparseTransformerCrossBlock", "per_batch_rows"]
