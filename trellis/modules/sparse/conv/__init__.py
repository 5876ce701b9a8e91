"""Sparse 3D convolution: kernel maps, the pure-PyTorch backend, and optional spconv / Triton backends."""

from trellis.modules.sparse.conv.conv import (
    SparseConv3d,
    SparseConvParams,
    SparseInverseConv3d,
    resolve_conv_backend,
    sparse_conv_features,
)
from trellis.modules.sparse.conv.kernel_map import KernelMap, strided_map, submanifold_map

__all__ = [
    "SparseConv3d",
    "SparseInverseConv3d",
    "SparseConvParams",
    "KernelMap",
    "submanifold_map",
    "strided_map",
    "sparse_conv_features",
    "resolve_conv_backend",
]
