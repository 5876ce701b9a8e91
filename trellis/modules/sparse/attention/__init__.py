"""Sparse attention: full (per batch item), windowed / swin, serialized, and cross-attention."""

from trellis.modules.sparse.attention.modules import SparseMultiHeadAttention
from trellis.modules.sparse.attention.partition import cross_plan, full_plan, serialized_plan, window_plan

__all__ = ["SparseMultiHeadAttention", "cross_plan", "full_plan", "serialized_plan", "window_plan"]
