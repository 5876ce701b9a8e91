"""Sparse 3D core: ``SparseTensor`` and the layers that act on it (a library that knows no model).

Attention lives in ``trellis.modules.sparse.attention`` and transformer blocks in
``trellis.modules.sparse.transformer``; they build on what is exported here.
"""

from trellis.modules.sparse.basic import SparseTensor, sparse_cat, sparse_debug_enabled, sparse_unbind
from trellis.modules.sparse.linear import SparseLinear
from trellis.modules.sparse.nonlinearity import SparseGELU, SparseReLU, SparseSigmoid, SparseSiLU, SparseTanh
from trellis.modules.sparse.norm import SparseGroupNorm, SparseGroupNorm32, SparseLayerNorm, SparseLayerNorm32
from trellis.modules.sparse.serialize import encode_seq
from trellis.modules.sparse.spatial import SparseDownsample, SparseSubdivide, SparseUpsample

__all__ = [
    "SparseTensor",
    "sparse_cat",
    "sparse_unbind",
    "sparse_debug_enabled",
    "SparseLinear",
    "SparseReLU",
    "SparseSiLU",
    "SparseGELU",
    "SparseTanh",
    "SparseSigmoid",
    "SparseLayerNorm",
    "SparseLayerNorm32",
    "SparseGroupNorm",
    "SparseGroupNorm32",
    "SparseDownsample",
    "SparseUpsample",
    "SparseSubdivide",
    "encode_seq",
]
