"""Sparse 3D core: ``SparseTensor`` and the layers that act on it (a library that knows no model).

Attention lives in ``trellis.modules.sparse.attention`` and transformer blocks in
``trellis.modules.sparse.transformer``; they build on what is exported here.
"""

from trellis.modules.sparse.basic import SparseTensor, sparse_cat, sparse_debug_enabled, sparse_unbind

__all__ = [
    "SparseTensor",
    "sparse_cat",
    "sparse_unbind",
    "sparse_debug_enabled",
]
