"""Dense attention layers and the variable-length attention core shared with sparse attention."""

from trellis.modules.attention.backend import BACKENDS, requested_backend, select_backend
from trellis.modules.attention.modules import MultiHeadAttention
from trellis.modules.attention.norm import MultiHeadRMSNorm
from trellis.modules.attention.rope import RotaryPositionEmbedder
from trellis.modules.attention.varlen import (
    VarlenPlan,
    attention_with_plan,
    dense_attention,
    naive_varlen_attention,
    packed_attention_with_plan,
    varlen_attention,
)

__all__ = [
    "BACKENDS",
    "MultiHeadAttention",
    "MultiHeadRMSNorm",
    "RotaryPositionEmbedder",
    "VarlenPlan",
    "attention_with_plan",
    "dense_attention",
    "naive_varlen_attention",
    "packed_attention_with_plan",
    "requested_backend",
    "select_backend",
    "varlen_attention",
]
